//! vman: a VM manager for one Linux host. See ARCHITECTURE.md for the map.

pub mod api;
pub mod app;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod fault;
pub mod logging;
pub mod metadata;
pub mod model;
pub mod observer;
pub mod operator;
pub mod service;
pub mod store;
pub mod sync;

//! Logging: one line per event, `timestamp | LEVEL | module | message`, to
//! stdout and to `{log_dir}/vman.log`, rotated by size like Python's
//! `RotatingFileHandler` (`vman.log.1` is the newest backup).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::LogLevel;
use crate::sync::LockExt;

/// The `timestamp | LEVEL | module | message` line format.
pub struct LineFormat;

fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        Level::DEBUG => "DEBUG",
        Level::TRACE => "TRACE",
    }
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        write!(
            writer,
            "{} | {} | {} | ",
            chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            level_name(meta.level()),
            meta.target()
        )?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// A log file that is rotated when the next line would push it past
/// `max_bytes`.
pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    backups: u32,
    state: Mutex<(File, u64)>,
}

impl RotatingFile {
    pub fn open(dir: &Path, max_bytes: u64, backups: u32) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let path = dir.join("vman.log");
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let len = file.metadata()?.len();
        Ok(Self {
            path,
            max_bytes,
            backups,
            state: Mutex::new((file, len)),
        })
    }

    fn rotate(&self, state: &mut MutexGuard<'_, (File, u64)>) -> io::Result<()> {
        let name = |i: u32| PathBuf::from(format!("{}.{i}", self.path.display()));
        if self.backups == 0 {
            fs::remove_file(&self.path).or_else(ignore_missing)?;
        } else {
            fs::remove_file(name(self.backups)).or_else(ignore_missing)?;
            for i in (1..self.backups).rev() {
                fs::rename(name(i), name(i + 1)).or_else(ignore_missing)?;
            }
            fs::rename(&self.path, name(1))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        **state = (file, 0);
        Ok(())
    }
}

fn ignore_missing(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

/// One write of a formatted event into the rotating file.
pub struct RotatingWriter<'a>(&'a RotatingFile);

impl Write for RotatingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut state = self.0.state.lock_or_recover();
        if self.0.max_bytes > 0 && state.1 > 0 && state.1 + buf.len() as u64 > self.0.max_bytes {
            self.0.rotate(&mut state)?;
        }
        state.0.write_all(buf)?;
        state.1 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for RotatingFile {
    type Writer = RotatingWriter<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        RotatingWriter(self)
    }
}

/// Installs the global subscriber. Fails when the log folder cannot be used.
pub fn init(level: LogLevel, dir: &Path, max_bytes: u64, backups: u32) -> io::Result<()> {
    let file = RotatingFile::open(dir, max_bytes, backups)?;
    let filter = EnvFilter::new(format!(
        "{},hyper=warn,tower=warn,reqwest=warn",
        level.as_filter()
    ));
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .event_format(LineFormat)
                .with_ansi(false)
                .with_writer(io::stdout),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .event_format(LineFormat)
                .with_ansi(false)
                .with_writer(file),
        )
        .try_init()
        .map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_n_backups() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = RotatingFile::open(dir.path(), 100, 2).expect("open");
        for i in 0..10 {
            let mut w = file.make_writer();
            w.write_all(format!("line {i:02} {}\n", "x".repeat(40)).as_bytes())
                .expect("write");
        }
        let main = fs::read_to_string(dir.path().join("vman.log")).expect("main");
        assert!(main.len() <= 100, "{}", main.len());
        assert!(main.contains("line 09"));
        assert!(dir.path().join("vman.log.1").exists());
        assert!(dir.path().join("vman.log.2").exists());
        assert!(!dir.path().join("vman.log.3").exists());
        let newest_backup = fs::read_to_string(dir.path().join("vman.log.1")).expect("b1");
        assert!(newest_backup.contains("line 07"));
    }
}

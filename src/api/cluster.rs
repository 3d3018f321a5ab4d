//! Cluster mode on the HTTP side: the `dispatch` middleware that decides,
//! for every request, whether this node answers it or forwards it to the
//! node that owns the VM; POST /vms placement; GET /vms merged from every
//! node's published VMs; cluster-wide templates; the cluster token on
//! node-to-node requests (`/cluster/internal/...` and forwarded ones);
//! publishing this node's VMs to etcd after each change; GET /cluster/nodes.
//! Without `--cluster` the middleware lets everything through untouched
//! and `/cluster/...` answers 404.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::{ApiError, ErrorBody};
use super::vms::VmResponse;
use super::AppState;
use crate::cluster::{placement, Cluster, ClusterError, TOKEN_HEADER};
use crate::model::Name;
use crate::sync::LockExt;

/// `state` of a VM whose node is offline.
pub const UNKNOWN: &str = "unknown";

fn not_clustered() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_clustered",
        "This node does not run in cluster mode (start vman serve with --cluster)",
    )
}

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> Self {
        let (status, code) = match &e {
            ClusterError::Unavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "cluster_unavailable")
            }
            ClusterError::NoMemory(_) => (StatusCode::BAD_REQUEST, "no_memory"),
            ClusterError::NodeUnavailable(_) => (StatusCode::BAD_REQUEST, "node_unavailable"),
            ClusterError::AlreadyExists => (StatusCode::BAD_REQUEST, "already_exists"),
            ClusterError::PlacementChanged(_) => (StatusCode::CONFLICT, "placement_changed"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

/// A node of GET /cluster/nodes.
#[derive(Debug, Serialize, ToSchema)]
pub struct NodeResponse {
    pub name: String,
    /// `online` (its lease is alive) or `offline`.
    pub status: &'static str,
    pub advertise: String,
    pub last_heartbeat: String,
    pub cpus: u64,
    /// Host memory × VMAN_MEMORY_OVERCOMMIT: what placement may reserve.
    pub memory_mib: u64,
    /// Memory of the VMs placed on the node.
    pub memory_reserved_mib: u64,
    pub vm_count: u64,
    pub version: String,
    /// Placement transactions the node retried after a conflict.
    pub placement_retries: u64,
}

/// The cluster's nodes (cluster mode only; answered from the watch-fed
/// cache, so also while etcd has no quorum).
#[utoipa::path(get, path = "/cluster/nodes", tag = "cluster",
    responses((status = 200, body = [NodeResponse]), (status = 404, body = ErrorBody)))]
pub async fn nodes(State(app): State<AppState>) -> Result<Json<Vec<NodeResponse>>, ApiError> {
    let cluster = app.cluster.as_ref().ok_or_else(not_clustered)?;
    let state = cluster.cache.lock_or_recover().clone();
    let mut out = Vec::new();
    for (name, member) in &state.members {
        let live = state.nodes.get(name);
        let rec = live.unwrap_or(member);
        let vm_count = state.placement.values().filter(|p| &p.node == name).count() as u64;
        out.push(NodeResponse {
            name: name.clone(),
            status: if live.is_some() { "online" } else { "offline" },
            advertise: rec.advertise.clone(),
            last_heartbeat: rec.heartbeat_at.clone(),
            cpus: rec.cpus,
            memory_mib: rec.memory_mib,
            memory_reserved_mib: state.reserved.get(name).copied().unwrap_or(0),
            vm_count,
            version: rec.version.clone(),
            placement_retries: rec.placement_retries,
        });
    }
    Ok(Json(out))
}

/// Joins the cluster (`--cluster`): the `Cluster` handle in `state`, and
/// the publisher of this node's VMs.
pub async fn join(state: &mut AppState, bound: std::net::SocketAddr) -> anyhow::Result<()> {
    let config = state.service.config().cluster.clone();
    let cluster = Cluster::start(&config, state.service.clone(), bound).await?;
    state.cluster = Some(cluster.clone());
    state
        .service
        .set_placement(Arc::new(crate::cluster::migration::EtcdPlacement(
            cluster.clone(),
        )));
    tokio::spawn(publisher(
        state.clone(),
        cluster,
        std::time::Duration::from_secs(1),
    ));
    Ok(())
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(nodes))
}

fn json_response(status: StatusCode, v: &impl Serialize) -> Response {
    match serde_json::to_vec(v) {
        Ok(b) => (status, [(header::CONTENT_TYPE, "application/json")], b).into_response(),
        Err(e) => {
            ApiError::from(crate::service::ServiceError::Internal(e.to_string())).into_response()
        }
    }
}

/// The middleware (see the module comment).
pub async fn dispatch(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let Some(cluster) = app.cluster.clone() else {
        if path.starts_with("/cluster/") && path != "/cluster/nodes" {
            return not_clustered().into_response();
        }
        return next.run(req).await;
    };
    if let Some(given) = req.headers().get(TOKEN_HEADER) {
        if !cluster.check_token(given.to_str().ok()) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "cluster_token",
                "Wrong X-Vman-Cluster-Token: node-to-node calls need the cluster's VMAN_CLUSTER_TOKEN",
            )
            .into_response();
        }
        // A node-to-node request: answered here, never forwarded again.
        return answer_here(&app, &cluster, req, next).await;
    }
    if path.starts_with("/cluster/internal/") {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "cluster_token",
            "Node-to-node routes need the X-Vman-Cluster-Token header",
        )
        .into_response();
    }
    let method = req.method().clone();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method.clone(), segments.as_slice()) {
        (Method::GET, ["vms"]) => list(&app, &cluster, req.uri().query()),
        (Method::POST, ["vms"]) => create(&app, &cluster, req, next).await,
        (_, ["vms", id, ..]) => {
            let id = (*id).to_owned();
            vm_request(&app, &cluster, &id, req, next).await
        }
        (Method::POST, ["templates"]) => create_template(&cluster, req, next).await,
        (Method::DELETE, ["templates", name]) => {
            let name = (*name).to_owned();
            delete_template(&cluster, &name, req, next).await
        }
        _ => next.run(req).await,
    }
}

/// Answers on this node, then publishes what a write changed: the VM's
/// JSON (or its release after a delete).
async fn answer_here(app: &AppState, cluster: &Arc<Cluster>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = next.run(req).await;
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if method == Method::GET || !resp.status().is_success() {
        return resp;
    }
    match (method, segments.as_slice()) {
        (Method::DELETE, ["vms", id]) => {
            if let Err(e) = placement::release(cluster, id).await {
                tracing::warn!("cluster: VM {id} deleted but its placement not released: {e}");
            }
            resp
        }
        (_, ["vms", id, ..]) => {
            publish(app, cluster, id).await;
            resp
        }
        _ => resp,
    }
}

/// The VM's JSON as this node answers GET /vms/{id}, with `node`.
fn local_view(app: &AppState, cluster: &Cluster, id: &Name) -> Option<Value> {
    let vm = app.service.get_vm(id).ok()?;
    let mut v = serde_json::to_value(VmResponse::from(&vm)).ok()?;
    v["node"] = Value::String(cluster.node.clone());
    Some(v)
}

/// Writes the VM's JSON to `vms/<id>` (or removes it when the VM is gone
/// here). Best effort: the publisher loop writes what failed again.
pub async fn publish(app: &AppState, cluster: &Cluster, id: &str) {
    let Ok(name) = Name::parse("vm_id", id) else {
        return;
    };
    let key = format!("vms/{id}");
    let written = match local_view(app, cluster, &name) {
        Some(v) => {
            let r = cluster.etcd.put(&key, v.to_string().into_bytes()).await;
            if r.is_ok() {
                cluster.cache.lock_or_recover().vms.insert(id.to_owned(), v);
            }
            r
        }
        None => cluster.etcd.delete(&key).await,
    };
    if let Err(e) = written {
        tracing::debug!("cluster: VM {id} not published now: {e}");
    }
}

/// Publishes every local VM whose JSON differs from what etcd holds, and
/// withdraws VMs placed here that this node does not have; every
/// `interval` for the life of the node (covers state changes no request
/// caused: QEMU exits, adoption after a restart, an etcd outage).
pub async fn publisher(app: AppState, cluster: Arc<Cluster>, interval: std::time::Duration) {
    loop {
        if let Ok(vms) = app.service.list_vms(None) {
            let (published, placed_here, loaded) = {
                let s = cluster.cache.lock_or_recover();
                let placed: Vec<String> = s
                    .placement
                    .iter()
                    .filter(|(_, p)| p.node == cluster.node)
                    .map(|(id, _)| id.clone())
                    .collect();
                (s.vms.clone(), placed, s.loaded)
            };
            if loaded {
                for vm in &vms {
                    let Some(v) = local_view(&app, &cluster, &vm.id) else {
                        continue;
                    };
                    if published.get(vm.id.as_str()) != Some(&v) {
                        publish(&app, &cluster, vm.id.as_str()).await;
                    }
                }
                for id in placed_here {
                    if !vms.iter().any(|v| v.id.as_str() == id) && published.contains_key(&id) {
                        publish(&app, &cluster, &id).await;
                    }
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// A VM's JSON for another node's VM: the published one, `unknown` while
/// its node is offline, always with `node`.
fn remote_view(state: &crate::cluster::cache::State, id: &str, node: &str) -> Option<Value> {
    let mut v = state.vms.get(id)?.clone();
    v["node"] = Value::String(node.to_owned());
    if !state.nodes.contains_key(node) {
        v["state"] = Value::String(UNKNOWN.into());
    }
    Some(v)
}

/// GET /vms: this node's VMs from its store, the others' as published.
fn list(app: &AppState, cluster: &Cluster, query: Option<&str>) -> Response {
    let wanted = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("state="));
    if let Some(w) = wanted {
        if !["running", "stopped", "error", UNKNOWN].contains(&w) {
            return ApiError::invalid("state", "must be one of running, stopped, error, unknown")
                .into_response();
        }
    }
    let local = match app.service.list_vms(None) {
        Ok(v) => v,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let mut all: BTreeMap<String, Value> = BTreeMap::new();
    {
        let state = cluster.cache.lock_or_recover();
        for (id, placed) in &state.placement {
            if placed.node != cluster.node {
                if let Some(v) = remote_view(&state, id, &placed.node) {
                    all.insert(id.clone(), v);
                }
            }
        }
    }
    for vm in &local {
        if let Ok(mut v) = serde_json::to_value(VmResponse::from(vm)) {
            v["node"] = Value::String(cluster.node.clone());
            all.insert(vm.id.to_string(), v);
        }
    }
    let mut list: Vec<Value> = all
        .into_values()
        .filter(|v| wanted.is_none_or(|w| v["state"] == w))
        .collect();
    list.sort_by(|a, b| {
        let key = |v: &Value| {
            (
                v["created_at"].as_str().unwrap_or("").to_owned(),
                v["id"].as_str().unwrap_or("").to_owned(),
            )
        };
        key(a).cmp(&key(b))
    });
    json_response(StatusCode::OK, &list)
}

async fn read_body(req: Request) -> Result<(axum::http::request::Parts, Bytes), Response> {
    let (parts, body) = req.into_parts();
    match axum::body::to_bytes(body, super::MAX_BODY_BYTES).await {
        Ok(b) => Ok((parts, b)),
        Err(_) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "Request body is too large (at most {} bytes)",
                super::MAX_BODY_BYTES
            ),
        )
        .into_response()),
    }
}

fn rebuild(mut parts: axum::http::request::Parts, body: Bytes) -> Request {
    parts.headers.remove(header::CONTENT_LENGTH);
    Request::from_parts(parts, Body::from(body))
}

/// Adds `node` to a JSON object answer (a VM).
async fn with_node(resp: Response, node: &str) -> Response {
    with_node_remembered(resp, node, None).await
}

/// `with_node`, and with `remember`, the answer (a VM's JSON) also goes
/// into this node's cache under that id: a VM created through this node is
/// in its very next GET /vms, before the owner's publication arrives.
async fn with_node_remembered(
    resp: Response,
    node: &str,
    remember: Option<(&Cluster, &str, u64)>,
) -> Response {
    if !resp.status().is_success() {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 16 * 1024 * 1024).await else {
        return ApiError::new(
            StatusCode::BAD_GATEWAY,
            "node_unreachable",
            "The owner's answer was cut",
        )
        .into_response();
    };
    let out = match serde_json::from_slice::<Value>(&bytes) {
        Ok(mut v @ Value::Object(_)) => {
            v["node"] = Value::String(node.to_owned());
            let out = Bytes::from(v.to_string());
            if let Some((cluster, id, memory_mib)) = remember {
                // Until the watch delivers the same (it then overwrites).
                let mut cache = cluster.cache.lock_or_recover();
                cache
                    .placement
                    .entry(id.to_owned())
                    .or_insert(crate::cluster::Placed {
                        node: node.to_owned(),
                        memory_mib,
                    });
                cache.vms.entry(id.to_owned()).or_insert(v);
            }
            out
        }
        _ => bytes,
    };
    let mut parts = parts;
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(out))
}

/// POST /vms: place (pinned `node`, or by policy), then create on the
/// chosen node with the same id; the placement is released when the
/// create is refused there.
async fn create(app: &AppState, cluster: &Arc<Cluster>, req: Request, next: Next) -> Response {
    if let Err(e) = cluster.check_quorum().await {
        return ApiError::from(e).into_response();
    }
    let (parts, body) = match read_body(req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    // Anything the single-host handler would refuse, it refuses here
    // itself (same answer), before anything is placed.
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(&body) else {
        return next.run(rebuild(parts, body)).await;
    };
    let pinned = match obj.remove("node") {
        None | Some(Value::Null) => None,
        Some(Value::String(n)) if crate::config::valid_node_name(&n) => Some(n),
        Some(_) => {
            return ApiError::invalid("node", "must be the name of a node of the cluster")
                .into_response()
        }
    };
    let template = obj
        .get("template_name")
        .and_then(Value::as_str)
        .and_then(|t| Name::parse("template_name", t).ok())
        .and_then(|t| app.service.get_template(&t).ok());
    let id = match obj.get("name") {
        None | Some(Value::Null) => Some(Name::generate()),
        Some(Value::String(n)) => Name::parse("name", n).ok(),
        Some(_) => None,
    };
    let (Some(template), Some(id)) = (template, id) else {
        let body = Bytes::from(Value::Object(obj).to_string());
        return next.run(rebuild(parts, body)).await;
    };
    let node =
        match placement::place(cluster, id.as_str(), template.ram_mib, pinned.as_deref()).await {
            Ok(n) => n,
            Err(e) => return ApiError::from(e).into_response(),
        };
    obj.insert("name".into(), Value::String(id.to_string()));
    let body = Bytes::from(Value::Object(obj).to_string());
    let resp = if node == cluster.node {
        let resp = next.run(rebuild(parts, body)).await;
        if resp.status().is_success() {
            publish(app, cluster, id.as_str()).await;
        }
        resp
    } else {
        match crate::cluster::forward::forward(
            cluster,
            &node,
            Method::POST,
            "/vms",
            &parts.headers,
            body,
        )
        .await
        {
            Ok(r) => r,
            Err(e) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "node_unreachable",
                e.to_string(),
            )
            .into_response(),
        }
    };
    if !resp.status().is_success() {
        if let Err(e) = placement::release(cluster, id.as_str()).await {
            tracing::warn!(
                "cluster: create of {id} failed and its placement was not released: {e}"
            );
        }
        return resp;
    }
    with_node_remembered(resp, &node, Some((cluster, id.as_str(), template.ram_mib))).await
}

/// Any request about one VM: here when it is placed here (or nowhere),
/// forwarded to its owner otherwise.
async fn vm_request(
    app: &AppState,
    cluster: &Arc<Cluster>,
    id: &str,
    req: Request,
    next: Next,
) -> Response {
    let placed = match cluster.placement_of(id) {
        Some(p) => Some(p),
        // The watch may not have brought a placement made a moment ago.
        None => match cluster.etcd.get(&format!("placement/{id}")).await {
            Ok(Some(e)) => serde_json::from_slice(&e.value).ok(),
            _ => None,
        },
    };
    let method = req.method().clone();
    let is_get = method == Method::GET;
    let whole_vm = req.uri().path().trim_end_matches('/').matches('/').count() == 2;
    let owner = placed.map(|p| p.node);
    let writes = !(is_get || method == Method::HEAD);
    if writes {
        if let Err(e) = cluster.check_quorum().await {
            return ApiError::from(e).into_response();
        }
    }
    match owner {
        None => next.run(req).await,
        Some(n) if n == cluster.node => {
            let resp = answer_here(app, cluster, req, next).await;
            if is_get && whole_vm {
                with_node(resp, &n).await
            } else {
                resp
            }
        }
        Some(n) => {
            if !cluster.is_online(&n) {
                if is_get && whole_vm {
                    let state = cluster.cache.lock_or_recover();
                    if let Some(v) = remote_view(&state, id, &n) {
                        return json_response(StatusCode::OK, &v);
                    }
                }
                return ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "node_offline",
                    format!("VM {id} is on node {n}, which is offline (its lease expired); its state is unknown until the node is back"),
                )
                .into_response();
            }
            if req.uri().path().ends_with("/console/ws") {
                return super::cluster_ws::relay(cluster, &n, req).await;
            }
            let pq = req
                .uri()
                .path_and_query()
                .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned());
            let (parts, body) = match read_body(req).await {
                Ok(x) => x,
                Err(r) => return r,
            };
            match crate::cluster::forward::forward(cluster, &n, method, &pq, &parts.headers, body)
                .await
            {
                Ok(resp) if is_get && whole_vm => with_node(resp, &n).await,
                Ok(resp) => resp,
                Err(e) => {
                    // Its lease has not expired yet, but it does not answer:
                    // reads get the last published JSON, state unknown.
                    if is_get && whole_vm {
                        let state = cluster.cache.lock_or_recover();
                        if let Some(mut v) = remote_view(&state, id, &n) {
                            v["state"] = Value::String(UNKNOWN.into());
                            return json_response(StatusCode::OK, &v);
                        }
                    }
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "node_unreachable",
                        e.to_string(),
                    )
                    .into_response()
                }
            }
        }
    }
}

/// POST /templates: created here, then in etcd (every node mirrors it);
/// without quorum nothing is kept.
async fn create_template(cluster: &Arc<Cluster>, req: Request, next: Next) -> Response {
    if let Err(e) = cluster.check_quorum().await {
        return ApiError::from(e).into_response();
    }
    let resp = next.run(req).await;
    if resp.status() != StatusCode::CREATED {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, super::MAX_BODY_BYTES).await else {
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Template answer lost",
        )
        .into_response();
    };
    let name = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v["name"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let key = format!("templates/{name}");
    let cond = vec![crate::cluster::etcd::Cond::Absent(key.clone())];
    let ops = vec![crate::cluster::etcd::Op::Put(key, bytes.to_vec())];
    match cluster.etcd.txn(cond, ops).await {
        Ok(true) => {}
        Ok(false) => tracing::info!("cluster: template {name} was in etcd already"),
        Err(e) => {
            if let Ok(n) = Name::parse("name", &name) {
                let _ = cluster.service.delete_template(&n);
            }
            return ApiError::from(ClusterError::from(e)).into_response();
        }
    }
    cluster
        .cache
        .lock_or_recover()
        .templates
        .insert(name, serde_json::from_slice(&bytes).unwrap_or(Value::Null));
    Response::from_parts(parts, Body::from(bytes))
}

/// DELETE /templates/{name}: refused while a VM of any node uses it.
async fn delete_template(cluster: &Arc<Cluster>, name: &str, req: Request, next: Next) -> Response {
    if let Err(e) = cluster.check_quorum().await {
        return ApiError::from(e).into_response();
    }
    let users = {
        let state = cluster.cache.lock_or_recover();
        state
            .placement
            .iter()
            .filter(|(_, p)| p.node != cluster.node)
            .filter(|(id, _)| {
                state
                    .vms
                    .get(*id)
                    .is_some_and(|v| v["vm_template"]["name"] == name)
            })
            .count()
    };
    if users > 0 {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "in_use",
            format!("Template is in use by {users} VM(s) on other nodes"),
        )
        .into_response();
    }
    let resp = next.run(req).await;
    if resp.status().is_success() {
        cluster.cache.lock_or_recover().templates.remove(name);
        if let Err(e) = cluster.etcd.delete(&format!("templates/{name}")).await {
            tracing::warn!("cluster: template {name} deleted here but not in etcd: {e}");
        }
    }
    resp
}

//! The HTTP API and the page: routes, request handling and the JSON views of jobs,
//! inversions and edits. Handlers check what the client sent, then hand work to the job
//! queue; nothing here runs the model.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::handler::Handler as _;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::{stream, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use crate::app::App;
use crate::error::{clip, ApiError};
use crate::ids::Id;
use crate::jobs::{JobEvent, JobKind, JobRecord, JobState, Work};
use crate::middleware;
use crate::params::{decode_image, invert_params, EditRequest, SIZE_MULTIPLE};
use crate::store::{EditRecord, InversionRecord, INPUT_PNG, INVERSION_FILE, RECONSTRUCTION_PNG};

type AppState = State<Arc<App>>;

const PAGE: &str = include_str!("../assets/index.html");
const OPENAPI: &str = include_str!("../assets/openapi.json");
/// Edit requests are small JSON documents.
const MAX_EDIT_BODY: usize = 64 * 1024;
/// The inversion form has 9 fields; a few more are refused by name, thousands are an
/// attack on the parser.
const MAX_FORM_FIELDS: usize = 32;

pub fn router(app: Arc<App>) -> Router {
    let max_body = app.limits.max_body_bytes;
    Router::new()
        .route("/", get(page))
        .route("/openapi.json", get(openapi))
        .route("/v1/info", get(info))
        .route("/v1/jobs", get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/events", get(job_events))
        .route("/v1/jobs/{id}/cancel", axum::routing::post(cancel_job))
        .route(
            "/v1/inversions",
            get(list_inversions).post(create_inversion),
        )
        .route(
            "/v1/inversions/{id}",
            get(get_inversion).delete(delete_inversion),
        )
        .route("/v1/inversions/{id}/file", get(inversion_file))
        .route("/v1/inversions/{id}/images/{name}", get(inversion_image))
        .route(
            "/v1/inversions/{id}/edits",
            get(list_edits).post(create_edit.layer(DefaultBodyLimit::max(MAX_EDIT_BODY))),
        )
        .route("/v1/inversions/{id}/edits/{edit}", get(get_edit))
        .route(
            "/v1/inversions/{id}/edits/{edit}/images/{name}",
            get(edit_image),
        )
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(from_fn_with_state(app.clone(), middleware::guard_body))
        .layer(from_fn_with_state(app.clone(), middleware::guard_origin))
        .layer(from_fn(middleware::json_errors))
        .with_state(app)
}

fn parse_id(what: &str, s: &str) -> Result<Id, ApiError> {
    Id::parse(s).ok_or_else(|| ApiError::invalid_id(what))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("a task failed: {e}")))?
}

async fn no_route(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_route",
        format!("no such endpoint: {method} {}", clip(uri.path(), 100)),
    )
}

// ---------------------------------------------------------------- views

fn merge(mut base: Value, extra: Value) -> Value {
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        b.extend(e);
    }
    base
}

pub fn inversion_view(r: &InversionRecord, edit_count: usize) -> Value {
    let base = format!("/v1/inversions/{}", r.id);
    merge(
        serde_json::to_value(r).unwrap_or_default(),
        json!({
            "edit_count": edit_count,
            "urls": {
                "self": base,
                "file": format!("{base}/file"),
                "input": format!("{base}/images/{INPUT_PNG}"),
                "reconstruction": format!("{base}/images/{RECONSTRUCTION_PNG}"),
                "edits": format!("{base}/edits"),
            }
        }),
    )
}

pub fn edit_view(r: &EditRecord) -> Value {
    let base = format!("/v1/inversions/{}/edits/{}", r.inversion_id, r.id);
    let pictures = |v: &[crate::store::StoredImage]| -> Value {
        v.iter()
            .map(|i| json!({ "prompt": i.prompt, "url": format!("{base}/images/{}", i.file) }))
            .collect()
    };
    let mut v = serde_json::to_value(r).unwrap_or_default();
    v["images"] = pictures(&r.images);
    v["attention_maps"] = pictures(&r.attention_maps);
    v["urls"] = json!({
        "self": base,
        "inversion": format!("/v1/inversions/{}", r.inversion_id),
    });
    v
}

fn job_view(app: &App, r: &JobRecord) -> Value {
    let base = format!("/v1/jobs/{}", r.id);
    let result = match (r.state, r.kind) {
        (JobState::Succeeded, JobKind::Inversion) => app
            .store
            .inversion(r.inversion_id)
            .map(|i| inversion_view(&i, app.store.edit_count(i.id))),
        (JobState::Succeeded, JobKind::Edit) => r
            .edit_id
            .and_then(|e| app.store.edit(r.inversion_id, e))
            .map(|e| edit_view(&e)),
        _ => None,
    };
    let position = (r.state == JobState::Queued)
        .then(|| app.jobs.queue_position(r.id))
        .flatten();
    merge(
        serde_json::to_value(r).unwrap_or_default(),
        json!({
            "queue_position": position,
            "result": result,
            "urls": {
                "self": base,
                "events": format!("{base}/events"),
                "cancel": format!("{base}/cancel"),
            }
        }),
    )
}

/// 202 with the queued job, or — with `?wait=true` — 200 with the job once it has ended.
async fn accepted(app: &Arc<App>, record: JobRecord, wait: bool) -> Response {
    let location = format!("/v1/jobs/{}", record.id);
    let (status, record) = if wait {
        (StatusCode::OK, wait_for(app, record).await)
    } else {
        // The worker may have taken it already.
        let now = app.jobs.get(record.id).map_or(record, |j| j.record());
        (StatusCode::ACCEPTED, now)
    };
    let mut res = (status, Json(job_view(app, &record))).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    res
}

async fn wait_for(app: &App, record: JobRecord) -> JobRecord {
    let Some(job) = app.jobs.get(record.id) else {
        return record;
    };
    if let Some(mut rx) = job.subscribe() {
        if !job.record().state.is_terminal() {
            loop {
                match rx.recv().await {
                    Ok(JobEvent::State(r)) if r.state.is_terminal() => break,
                    Err(RecvError::Closed) => break,
                    _ => {}
                }
            }
        }
    }
    job.record()
}

#[derive(Debug, Deserialize)]
struct WaitQuery {
    #[serde(default)]
    wait: bool,
}

// ---------------------------------------------------------------- the page and info

async fn page() -> Response {
    let mut res = Html(PAGE).into_response();
    res.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; \
             script-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
        ),
    );
    // No other site may frame the page (clickjacking); the header for older browsers.
    res.headers_mut()
        .insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    res
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn info(State(app): AppState) -> Json<Value> {
    let sd = &app.sd;
    let (queued, running) = app.jobs.status();
    let l = &app.limits;
    let device = if sd.device.is_cuda() {
        "cuda"
    } else if sd.device.is_metal() {
        "metal"
    } else {
        "cpu"
    };
    let latent = sd.default_image_size() / sd.vae_scale_factor();
    Json(json!({
        "name": "nulltext",
        "version": env!("CARGO_PKG_VERSION"),
        "model": {
            "name": sd.name,
            "fingerprint": sd.fingerprint,
            "family": sd.family().name(),
            "default_size": sd.default_image_size(),
            "attention_downscale": nulltext::edit::attention_downscale_for((latent, latent)),
            "device": device,
            "dtype": format!("{:?}", sd.dtype).to_lowercase(),
        },
        "limits": {
            "max_body_bytes": l.max_body_bytes,
            "max_pixels": l.max_pixels,
            "max_prompt_chars": l.max_prompt_chars,
            "max_targets": l.max_targets,
            "max_steps": l.max_steps,
            "max_inner_steps": l.max_inner_steps,
            "max_size": l.max_size,
            "size_multiple": SIZE_MULTIPLE,
        },
        "queue": { "queued": queued, "capacity": app.jobs.capacity(), "running": running },
    }))
}

// ---------------------------------------------------------------- jobs

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

async fn list_jobs(State(app): AppState, Query(q): Query<ListQuery>) -> Json<Value> {
    let jobs: Vec<Value> = app
        .jobs
        .list()
        .iter()
        .take(q.limit.unwrap_or(100))
        .map(|r| job_view(&app, r))
        .collect();
    Json(json!({ "jobs": jobs }))
}

async fn get_job(State(app): AppState, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = parse_id("job", &id)?;
    let job = app
        .jobs
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("no job {id}")))?;
    Ok(Json(job_view(&app, &job.record())))
}

async fn cancel_job(State(app): AppState, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = parse_id("job", &id)?;
    let app2 = app.clone();
    let r = blocking(move || app2.jobs.cancel(id)).await?;
    Ok(Json(job_view(&app, &r)))
}

fn sse_event(app: &App, event: JobEvent) -> SseEvent {
    let (name, data) = match event {
        JobEvent::State(r) => ("state", job_view(app, &r)),
        JobEvent::Progress(p) => ("progress", serde_json::to_value(p).unwrap_or_default()),
        JobEvent::Iteration {
            step,
            iteration,
            loss,
        } => (
            "iteration",
            json!({ "step": step, "iteration": iteration, "loss": loss }),
        ),
        JobEvent::Step {
            step,
            iterations,
            loss,
        } => (
            "step",
            json!({ "step": step, "iterations": iterations, "loss": loss }),
        ),
    };
    SseEvent::default().event(name).data(data.to_string())
}

/// Server-sent events: the job's record first (`state`), then `progress`, `iteration`,
/// `step` and `state` events as they happen; the stream ends with the job.
async fn job_events(
    State(app): AppState,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let id = parse_id("job", &id)?;
    let job = app
        .jobs
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("no job {id}")))?;
    // Subscribe before reading the record: nothing between the two is missed.
    let rx = job.subscribe();
    let snapshot = job.record();
    let first = sse_event(&app, JobEvent::State(Box::new(snapshot.clone())));
    let live = if snapshot.state.is_terminal() {
        None
    } else {
        rx
    };
    let rest = stream::unfold((live, app.clone()), |(rx, app)| async move {
        let mut rx = rx?;
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    let e = sse_event(&app, ev);
                    return Some((e, (Some(rx), app)));
                }
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return None,
            }
        }
    });
    let events = stream::once(async move { first })
        .chain(rest)
        .map(Ok::<_, Infallible>);
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

// ---------------------------------------------------------------- inversions

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    let status = e.status();
    ApiError::new(status, ApiError::code_for(status), e.body_text())
}

async fn create_inversion(
    State(app): AppState,
    Query(q): Query<WaitQuery>,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
    let mut mp = multipart.map_err(|e| {
        let status = e.status();
        ApiError::new(status, ApiError::code_for(status), e.body_text())
    })?;
    // A full queue is answered before the body is read, let alone decoded.
    app.jobs.check_capacity()?;
    let mut image: Option<Bytes> = None;
    let mut fields: Vec<(String, String)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    while let Some(field) = mp.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or("").to_string();
        if seen.len() >= MAX_FORM_FIELDS {
            return Err(ApiError::bad_request(format!(
                "the form has more than {MAX_FORM_FIELDS} fields"
            )));
        }
        if !seen.insert(name.clone()) {
            return Err(ApiError::bad_request(format!(
                "the field `{}` is given twice",
                clip(&name, 64)
            )));
        }
        if name == "image" {
            image = Some(field.bytes().await.map_err(multipart_error)?);
        } else {
            let text = field.text().await.map_err(multipart_error)?;
            fields.push((name, text));
        }
    }
    let default_size = u32::try_from(app.sd.default_image_size()).unwrap_or(u32::MAX);
    let params = invert_params(&fields, &app.limits, default_size)?;
    params.options.validate(&app.sd.scheduler)?;
    let bytes = image.ok_or_else(|| ApiError::bad_request("the field `image` is missing"))?;
    // Decoding is bounded: a few uploads at a time, each after the queue has room.
    let permit = app
        .decodes
        .acquire()
        .await
        .map_err(|_| ApiError::internal("the server is shutting down"))?;
    app.jobs.check_capacity()?;
    let app2 = app.clone();
    let record = blocking(move || {
        let raw = decode_image(&bytes, &app2.limits)?;
        let image = nulltext::image_io::prepare(
            &raw,
            params.crop,
            params.size,
            std::path::Path::new("the image"),
        )?;
        app2.jobs.submit(
            JobKind::Inversion,
            Id::random(),
            None,
            Work::Invert {
                image: Box::new(image),
                params,
            },
        )
    })
    .await?;
    drop(permit);
    Ok(accepted(&app, record, q.wait).await)
}

async fn list_inversions(State(app): AppState) -> Json<Value> {
    let v: Vec<Value> = app
        .store
        .inversions()
        .iter()
        .map(|(r, n)| inversion_view(r, *n))
        .collect();
    Json(json!({ "inversions": v }))
}

fn find_inversion(app: &App, id: &str) -> Result<InversionRecord, ApiError> {
    let id = parse_id("inversion", id)?;
    app.store
        .inversion(id)
        .ok_or_else(|| ApiError::not_found(format!("no inversion {id}")))
}

async fn get_inversion(
    State(app): AppState,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let r = find_inversion(&app, &id)?;
    Ok(Json(inversion_view(&r, app.store.edit_count(r.id))))
}

async fn delete_inversion(
    State(app): AppState,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let r = find_inversion(&app, &id)?;
    if app.jobs.uses_inversion(r.id) {
        return Err(ApiError::conflict(format!(
            "a queued or running job uses inversion {}; cancel it or wait",
            r.id
        )));
    }
    let app2 = app.clone();
    blocking(move || {
        app2.store
            .delete_inversion(r.id)
            .map_err(|e| ApiError::internal(format!("{e:#}")))
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn send_file(
    path: std::path::PathBuf,
    content_type: &'static str,
    download: Option<String>,
) -> Result<Response, ApiError> {
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|e| ApiError::internal(format!("cannot read a stored file: {e}")))?;
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=31536000, immutable"),
    );
    if let Some(name) =
        download.and_then(|n| HeaderValue::from_str(&format!("attachment; filename=\"{n}\"")).ok())
    {
        headers.insert(header::CONTENT_DISPOSITION, name);
    }
    Ok((headers, Body::from(bytes)).into_response())
}

/// The standard inversion file, usable with `nulltext edit --inversion`.
async fn inversion_file(
    State(app): AppState,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let r = find_inversion(&app, &id)?;
    let path = app
        .store
        .inversion_file(r.id, INVERSION_FILE)
        .ok_or_else(|| ApiError::not_found(format!("no inversion {}", r.id)))?;
    send_file(
        path,
        "application/octet-stream",
        Some(format!("{}.nti.safetensors", r.id)),
    )
    .await
}

async fn inversion_image(
    State(app): AppState,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let r = find_inversion(&app, &id)?;
    let file = match name.as_str() {
        INPUT_PNG => INPUT_PNG,
        RECONSTRUCTION_PNG => RECONSTRUCTION_PNG,
        _ => {
            return Err(ApiError::not_found(format!(
                "no image `{}` (input.png, reconstruction.png)",
                clip(&name, 64)
            )))
        }
    };
    let path = app
        .store
        .inversion_file(r.id, file)
        .ok_or_else(|| ApiError::not_found(format!("no inversion {}", r.id)))?;
    send_file(path, "image/png", None).await
}

// ---------------------------------------------------------------- edits

async fn create_edit(
    State(app): AppState,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
    body: Result<Json<EditRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let inv = find_inversion(&app, &id)?;
    let Json(request) = body.map_err(|e| {
        let status = e.status();
        ApiError::new(status, ApiError::code_for(status), e.body_text())
    })?;
    let sd = &app.sd;
    if inv.model_fingerprint != sd.fingerprint {
        return Err(ApiError::conflict(format!(
            "inversion {} was made with model `{}` (fingerprint {}); this server runs `{}` \
             (fingerprint {})",
            inv.id, inv.model, inv.model_fingerprint, sd.name, sd.fingerprint
        )));
    }
    let options = request.options(&app.limits)?;
    let app2 = app.clone();
    app.jobs.check_capacity()?;
    let record = blocking(move || {
        // The words and windows against the tokenizer, SDEdit's start against the steps,
        // before anything is queued.
        let f = app2.sd.vae_scale_factor();
        nulltext::edit::check_edit(
            &app2.sd,
            &inv.prompt,
            &request.targets,
            &options,
            inv.steps,
            (inv.height as usize / f, inv.width as usize / f),
        )?;
        app2.jobs.submit(
            JobKind::Edit,
            inv.id,
            Some(Id::random()),
            Work::Edit {
                request,
                options: Box::new(options),
            },
        )
    })
    .await?;
    Ok(accepted(&app, record, q.wait).await)
}

async fn list_edits(State(app): AppState, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let inv = find_inversion(&app, &id)?;
    let edits: Vec<Value> = app
        .store
        .edits(inv.id)
        .unwrap_or_default()
        .iter()
        .map(edit_view)
        .collect();
    Ok(Json(json!({ "edits": edits })))
}

fn find_edit(app: &App, id: &str, edit: &str) -> Result<EditRecord, ApiError> {
    let inv = find_inversion(app, id)?;
    let edit = parse_id("edit", edit)?;
    app.store
        .edit(inv.id, edit)
        .ok_or_else(|| ApiError::not_found(format!("inversion {} has no edit {edit}", inv.id)))
}

async fn get_edit(
    State(app): AppState,
    Path((id, edit)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(edit_view(&find_edit(&app, &id, &edit)?)))
}

async fn edit_image(
    State(app): AppState,
    Path((id, edit, name)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let e = find_edit(&app, &id, &edit)?;
    let path = app
        .store
        .edit_file(e.inversion_id, e.id, &name)
        .ok_or_else(|| {
            ApiError::not_found(format!("edit {} has no image `{}`", e.id, clip(&name, 64)))
        })?;
    send_file(path, "image/png", None).await
}

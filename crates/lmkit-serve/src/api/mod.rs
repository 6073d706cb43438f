//! The OpenAI-compatible endpoints: request parsing and validation, running the choices through
//! the engine, streaming them as Server-Sent Events, and logging every completion. One file per
//! concern; they share their imports and items through this module.

mod handlers;
mod log;
mod logprobs;
mod prompt;
pub mod retrieval;
mod stream;
mod structured;
mod types;
mod validate;

pub use handlers::{chat_completions, completions, embeddings};
pub(crate) use validate::parse as parse_json;

use crate::engine::{Event, Job, Rejected};
use crate::error::ApiError;
use crate::moderation::{Policy, Verdict};
use crate::store::{now, Completion};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use lmkit_infer::{Finish, GenerateOptions, SamplingParams, TextStream};
use log::*;
use prompt::*;
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use stream::*;
use tokio::sync::mpsc;
use types::*;
use validate::*;

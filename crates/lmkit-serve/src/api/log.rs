//! Storing every finished completion (prompt, output, parameters, moderation, tokens — the
//! prompt's, the prefix cache's share of them, the completion's — latency).

use super::*;

/// Stores one row per choice; waits for the write so a client that got its answer finds it.
pub(super) async fn log(state: &Arc<AppState>, prep: &Prepared, o: &Outcome, started: Instant) {
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    // Each choice's row with the verdict on its own text.
    let policy = format!("{:?}", state.moderator.policy).to_lowercase();
    let moderation = |i: usize| {
        json!({
            "prompt": prep.prompt_verdict,
            "completion": o.verdicts.get(i).cloned().unwrap_or_default(),
            "policy": policy,
        })
        .to_string()
    };
    let rows: Vec<Completion> = o
        .texts
        .iter()
        .zip(&o.reasons)
        .enumerate()
        .map(|(i, (t, r))| Completion {
            id: if o.texts.len() == 1 {
                prep.id.clone()
            } else {
                format!("{}-{i}", prep.id)
            },
            request_id: prep.id.clone(),
            created: now(),
            endpoint: prep.endpoint.to_string(),
            model: state.variant_name(prep.params.model).to_string(),
            prompt: prep.prompt_text.clone(),
            messages: prep.messages.clone(),
            output: t.clone(),
            params: prep.params.json.to_string(),
            moderation: moderation(i),
            prompt_tokens: prep.prompt_ids.len() as i64,
            cached_tokens: o.cached_tokens as i64,
            completion_tokens: o.tokens.get(i).copied().unwrap_or(0) as i64,
            latency_ms,
            finish_reason: r.to_string(),
            rating: None,
            comment: None,
            correction: None,
        })
        .collect();
    let store = state.store.clone();
    let res = tokio::task::spawn_blocking(move || {
        for r in &rows {
            store.insert(r)?;
        }
        Ok::<_, crate::store::StoreError>(())
    })
    .await;
    match res {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("lmkit serve: could not store {}: {e}", prep.id),
        Err(e) => eprintln!("lmkit serve: could not store {}: {e}", prep.id),
    }
}

//! Renders library progress reports ([`lmkit_core::Progress`]) as terminal progress bars (hidden
//! when stderr is not a terminal).

use indicatif::{ProgressBar, ProgressStyle};
use lmkit_core::{Progress, Unit};
use std::sync::Mutex;

#[derive(Default)]
pub struct Bar {
    bar: Mutex<Option<ProgressBar>>,
}

impl Bar {
    fn with(&self, f: impl FnOnce(&ProgressBar)) {
        if let Ok(b) = self.bar.lock() {
            if let Some(b) = b.as_ref() {
                f(b);
            }
        }
    }
}

impl Progress for Bar {
    fn begin(&self, stage: &str, total: u64, unit: Unit) {
        let template = match unit {
            Unit::Bytes => "{msg:>18} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            Unit::Items => "{msg:>18} [{bar:30}] {human_pos}/{human_len} {per_sec} eta {eta}",
            Unit::Steps => "{bar:30} {pos}/{len} steps  {msg}  eta {eta}",
        };
        let bar = if total > 0 {
            ProgressBar::new(total).with_style(
                ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            )
        } else {
            ProgressBar::new_spinner()
        };
        if unit != Unit::Steps {
            bar.set_message(stage.to_string());
        }
        if let Ok(mut b) = self.bar.lock() {
            *b = Some(bar);
        }
    }

    fn set_position(&self, pos: u64) {
        self.with(|b| b.set_position(pos));
    }

    fn advance(&self, n: u64) {
        self.with(|b| b.inc(n));
    }

    fn status(&self, msg: &str) {
        self.with(|b| b.set_message(msg.to_string()));
    }

    fn message(&self, msg: &str) {
        // A hidden bar (stderr not a terminal) prints nothing: log lines go straight to stderr.
        match self.bar.lock().ok().and_then(|g| g.clone()) {
            Some(b) if !b.is_hidden() => b.println(msg),
            _ => eprintln!("{msg}"),
        }
    }

    fn finish(&self) {
        if let Ok(mut b) = self.bar.lock() {
            if let Some(b) = b.take() {
                b.finish_and_clear();
            }
        }
    }
}

//! Renders library progress reports as terminal progress bars (hidden when stderr is not a terminal).

use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Mutex;

#[derive(Default)]
pub struct Bar {
    bar: Mutex<Option<ProgressBar>>,
}

impl Bar {
    fn begin(&self, stage: &str, total: u64, bytes: bool) {
        let template = if bytes {
            "{msg:>18} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
        } else {
            "{msg:>18} [{bar:30}] {human_pos}/{human_len} {per_sec} eta {eta}"
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
        bar.set_message(stage.to_string());
        if let Ok(mut b) = self.bar.lock() {
            *b = Some(bar);
        }
    }

    fn advance(&self, n: u64) {
        if let Ok(b) = self.bar.lock() {
            if let Some(b) = b.as_ref() {
                b.inc(n);
            }
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

/// Each library has its own progress trait (they share no crate); all render through [`Bar`].
macro_rules! impl_progress {
    ($bytes:expr; $($t:path),*) => {$(
        impl $t for Bar {
            fn begin(&self, stage: &str, total: u64) {
                Bar::begin(self, stage, total, $bytes)
            }
            fn advance(&self, n: u64) {
                Bar::advance(self, n)
            }
            fn finish(&self) {
                Bar::finish(self)
            }
        }
    )*};
}

impl_progress!(true; lmkit_ngram::Progress, lmkit_data::Progress);
impl_progress!(false; lmkit_eval::Progress);

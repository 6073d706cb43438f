//! `metrics.jsonl` (one JSON object per logged step) and the loss curve `loss.svg` beside it.

use crate::error::{Result, TrainError};
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// Quantities a run logs beside its loss, by name.
pub type Extra = BTreeMap<String, f64>;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Record {
    pub step: usize,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tokens_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tokens: Option<u64>,
    /// What else a run logs under its own names (preference tuning: `rewards/chosen`,
    /// `rewards/margins`, ..., and `eval_`-prefixed for validation).
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty", default)]
    pub extra: Extra,
}

impl Record {
    /// A validation loss after `step`.
    pub fn validation(step: usize, val_loss: f64) -> Record {
        Record {
            step,
            val_loss: Some(val_loss),
            loss: None,
            lr: None,
            grad_norm: None,
            tokens_per_sec: None,
            tokens: None,
            extra: BTreeMap::new(),
        }
    }
}

pub fn read(path: &Path) -> Vec<Record> {
    std::fs::read_to_string(path)
        .map(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Keeps only records up to `step` (after a resume, so that the curve has no duplicate steps).
pub fn truncate_after(path: &Path, step: usize) -> Result<()> {
    let kept: Vec<Record> = read(path).into_iter().filter(|r| r.step <= step).collect();
    let mut text = String::new();
    for r in &kept {
        text.push_str(&serde_json::to_string(r).unwrap_or_default());
        text.push('\n');
    }
    // (Replaced whole: a crash here leaves the old records, not half of them.)
    Ok(lmkit_core::write_atomic_bytes(path, text.as_bytes())?)
}

pub fn append(path: &Path, r: &Record) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| TrainError::io(path, e))?;
    let line = serde_json::to_string(r).unwrap_or_default();
    writeln!(f, "{line}").map_err(|e| TrainError::io(path, e))
}

/// Draws training and validation loss against step into an SVG file.
pub fn plot(records: &[Record], path: &Path) -> Result<()> {
    let train: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| r.loss.map(|l| (r.step as f64, l)))
        .collect();
    let val: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| r.val_loss.map(|l| (r.step as f64, l)))
        .collect();
    if train.is_empty() {
        return Ok(());
    }
    let max_step = train.iter().chain(&val).map(|p| p.0).fold(1.0, f64::max);
    let max_loss = train.iter().chain(&val).map(|p| p.1).fold(0.0, f64::max) * 1.05;
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("loss", ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..max_step, 0.0..max_loss.max(1e-3))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .draw()?;
        chart
            .draw_series(LineSeries::new(train.clone(), &BLUE))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLUE));
        if !val.is_empty() {
            chart
                .draw_series(LineSeries::new(val.clone(), &RED))?
                .label("validation")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| TrainError::io(path, std::io::Error::other(e.to_string())))
}

//! Progress reports from long-running work. Libraries never print: they report through this
//! trait, and the command line renders the reports as progress bars.

/// What a stage's `total` and `advance` count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Bytes,
    /// Lines, documents, examples.
    Items,
    /// Optimisation steps.
    Steps,
}

pub trait Progress: Sync {
    /// A stage starts; `total` is in `unit`s, 0 when unknown.
    fn begin(&self, _stage: &str, _total: u64, _unit: Unit) {}
    /// Work done so far in the current stage.
    fn set_position(&self, _pos: u64) {}
    fn advance(&self, _n: u64) {}
    /// A short status shown beside the bar (e.g. the current loss), replaced by the next one.
    fn status(&self, _msg: &str) {}
    /// A line for the log, kept above the bar.
    fn message(&self, _msg: &str) {}
    /// The current stage is done.
    fn finish(&self) {}
}

/// Reports nothing.
pub struct NoProgress;
impl Progress for NoProgress {}

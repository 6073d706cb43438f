//! `lmkit moderation ...`: train and try the moderation classifier and rules that `lmkit serve` uses.

use anyhow::Result;
use clap::Subcommand;
use lmkit_serve::classifier::{self, Classifier};
use lmkit_serve::moderation::{Moderator, Policy};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum ModerationCommand {
    /// Train a classifier from examples to flag and examples to allow (one per line)
    #[command(
        after_help = "Example:\n  lmkit moderation train --flagged harmful.txt --allowed benign.txt --output moderation/\n\n\
        Two character n-gram models (flagged / allowed); a text is flagged when its log-likelihood ratio\n\
        per character passes the threshold chosen by cross-validation. Writes OUTPUT/classifier.json\n\
        (threshold and cross-validated accuracy, precision, recall) and two .lmkb models.\n\
        Use it with `lmkit serve --moderation-classifier OUTPUT`."
    )]
    Train {
        #[arg(long)]
        flagged: PathBuf,
        #[arg(long)]
        allowed: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// n-gram order (characters)
        #[arg(long, default_value_t = 4)]
        order: usize,
        /// Category reported when the classifier flags a text
        #[arg(long, default_value = "harmful")]
        category: String,
        #[arg(long, default_value_t = 5)]
        folds: usize,
    },
    /// Check texts against rules and/or a classifier and print the verdicts as JSON lines
    #[command(
        after_help = "Examples:\n  lmkit moderation check --rules configs/moderation-rules.txt \"I will kill them\"\n  \
        lmkit moderation check --classifier moderation/ \"some text\" \"another text\""
    )]
    Check {
        #[arg(long)]
        rules: Option<PathBuf>,
        #[arg(long)]
        classifier: Option<PathBuf>,
        #[arg(required = true)]
        texts: Vec<String>,
    },
}

/// The moderator `lmkit serve` and `lmkit moderation check` build from their options.
pub fn moderator(
    rules: Option<&PathBuf>,
    classifier: Option<&PathBuf>,
    policy: Policy,
) -> Result<Moderator> {
    let mut m = match rules {
        Some(p) => Moderator::load(p, policy).map_err(anyhow::Error::msg)?,
        None => Moderator::parse("", "", policy).map_err(anyhow::Error::msg)?,
    };
    if let Some(dir) = classifier {
        m = m.with_classifier(Classifier::load(dir)?);
    }
    Ok(m)
}

pub fn run(cmd: ModerationCommand) -> Result<()> {
    match cmd {
        ModerationCommand::Train {
            flagged,
            allowed,
            output,
            order,
            category,
            folds,
        } => {
            if !(2..=lmkit_ngram::MAX_ORDER).contains(&order) {
                anyhow::bail!("--order must be between 2 and {}", lmkit_ngram::MAX_ORDER);
            }
            let info = classifier::train(&flagged, &allowed, &output, order, &category, folds)?;
            eprintln!(
                "wrote {} ({} flagged / {} allowed examples): {}-fold cross-validated accuracy {:.3}, precision {:.3}, recall {:.3}, threshold {:.4}",
                output.display(),
                info.flagged_examples,
                info.allowed_examples,
                info.folds,
                info.accuracy,
                info.precision,
                info.recall,
                info.threshold
            );
            Ok(())
        }
        ModerationCommand::Check {
            rules,
            classifier,
            texts,
        } => {
            if rules.is_none() && classifier.is_none() {
                anyhow::bail!("give --rules, --classifier or both");
            }
            let m = moderator(rules.as_ref(), classifier.as_ref(), Policy::Flag)?;
            let c = classifier
                .as_ref()
                .map(|d| Classifier::load(d))
                .transpose()?;
            for t in &texts {
                let v = m.check(t);
                let mut line = serde_json::json!({"text": t, "flagged": v.flagged, "categories": v.categories});
                if let Some(c) = &c {
                    line["classifier_score"] = serde_json::json!(c.score(t));
                    line["threshold"] = serde_json::json!(c.info.threshold);
                }
                println!("{line}");
            }
            Ok(())
        }
    }
}

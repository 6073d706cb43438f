//! Moderation of prompts and completions by a configurable rule list: each rule is a category and a
//! regular expression (case-insensitive). What happens to flagged text is the server's policy.

use serde::Serialize;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Refuse flagged prompts (400) and cut flagged completions (finish_reason `content_filter`).
    Refuse,
    /// Answer, but mark the response and the log as flagged.
    Flag,
    /// No moderation.
    Off,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Policy, String> {
        match s {
            "refuse" => Ok(Policy::Refuse),
            "flag" => Ok(Policy::Flag),
            "off" => Ok(Policy::Off),
            _ => Err(format!(
                "unknown moderation policy `{s}` (expected refuse, flag or off)"
            )),
        }
    }
}

struct Rule {
    category: String,
    re: regex::Regex,
}

/// The outcome of checking one text.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Verdict {
    pub flagged: bool,
    /// Categories of the rules that matched, in rule order, without repeats.
    pub categories: Vec<String>,
}

impl Verdict {
    /// The verdict on several texts: flagged where one of them is, with their categories in
    /// the order first met.
    pub fn of_all<'a>(verdicts: impl IntoIterator<Item = &'a Verdict>) -> Verdict {
        let mut all = Verdict::default();
        for v in verdicts {
            all.flagged |= v.flagged;
            for c in &v.categories {
                if !all.categories.contains(c) {
                    all.categories.push(c.clone());
                }
            }
        }
        all
    }
}

pub struct Moderator {
    rules: Vec<Rule>,
    classifier: Option<crate::classifier::Classifier>,
    pub policy: Policy,
}

impl Moderator {
    pub fn none() -> Moderator {
        Moderator {
            rules: Vec::new(),
            classifier: None,
            policy: Policy::Off,
        }
    }

    /// Parses rules, one per line: `category: regex`. Blank lines and `#` comments are skipped.
    /// `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str, policy: Policy) -> Result<Moderator, String> {
        let mut rules = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (cat, pat) = line.split_once(':').ok_or_else(|| {
                format!(
                    "{origin}:{}: expected `category: regex`, got `{line}`",
                    i + 1
                )
            })?;
            let (cat, pat) = (cat.trim(), pat.trim());
            if cat.is_empty() || pat.is_empty() {
                return Err(format!(
                    "{origin}:{}: both the category and the regex must be non-empty",
                    i + 1
                ));
            }
            let re = regex::RegexBuilder::new(pat)
                .case_insensitive(true)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| format!("{origin}:{}: bad regex: {e}", i + 1))?;
            rules.push(Rule {
                category: cat.to_string(),
                re,
            });
        }
        Ok(Moderator {
            rules,
            classifier: None,
            policy,
        })
    }

    pub fn load(path: &Path, policy: Policy) -> Result<Moderator, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Moderator::parse(&text, &path.display().to_string(), policy)
    }

    /// Adds a trained classifier (see `crate::classifier`); its category is reported when it flags.
    pub fn with_classifier(mut self, c: crate::classifier::Classifier) -> Moderator {
        self.classifier = Some(c);
        self
    }

    pub fn active(&self) -> bool {
        self.policy != Policy::Off && (!self.rules.is_empty() || self.classifier.is_some())
    }

    /// Checks `text` as written and as [`fold`]ed, so that fullwidth letters, invisible
    /// characters and look-alike letters do not slip past the rules.
    pub fn check(&self, text: &str) -> Verdict {
        let mut v = Verdict::default();
        if self.policy == Policy::Off {
            return v;
        }
        let folded = fold(text);
        let forms = [text, folded.as_str()];
        for r in &self.rules {
            if forms.iter().any(|t| r.re.is_match(t)) && !v.categories.contains(&r.category) {
                v.categories.push(r.category.clone());
            }
        }
        if let Some(c) = &self.classifier {
            if forms.iter().any(|t| c.flags(t)) && !v.categories.contains(&c.info.category) {
                v.categories.push(c.info.category.clone());
            }
        }
        v.flagged = !v.categories.is_empty();
        v
    }
}

/// Characters that render as nothing (or only steer rendering): zero-width spaces and joiners,
/// word joiner, byte-order mark, soft hyphen, bidirectional controls, variation selectors.
fn invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{180E}'
        | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
        | '\u{FFA0}' | '\u{E0000}'..='\u{E007F}')
}

/// Latin letters that Cyrillic and Greek ones are mistaken for (Unicode's confusables for the
/// lower-case letters people use to dodge word filters).
fn unconfuse(c: char) -> char {
    match c {
        'а' | 'α' => 'a',
        'в' => 'b',
        'с' | 'ϲ' => 'c',
        'ԁ' => 'd',
        'е' | 'ε' => 'e',
        'һ' => 'h',
        'і' | 'ι' | 'ı' => 'i',
        'ј' => 'j',
        'к' | 'κ' => 'k',
        'м' => 'm',
        'п' | 'η' => 'n',
        'о' | 'ο' | 'σ' => 'o',
        'р' | 'ρ' => 'p',
        'ԛ' => 'q',
        'г' => 'r',
        'ѕ' => 's',
        'т' | 'τ' => 't',
        'υ' => 'u',
        'ν' => 'v',
        'ԝ' | 'ω' => 'w',
        'х' | 'χ' => 'x',
        'у' | 'γ' => 'y',
        'ᴢ' => 'z',
        c => c,
    }
}

/// The form rules also see: NFKC (fullwidth and styled letters to plain ones), invisible
/// characters removed, lower case, look-alike letters folded to Latin.
pub fn fold(text: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    if text.is_ascii() {
        // NFKC, the invisible characters and the look-alikes are all outside ASCII: the same
        // result without the Unicode passes (checks run on every streamed token).
        return text.to_ascii_lowercase();
    }
    text.nfkc()
        .filter(|&c| !invisible(c))
        .flat_map(char::to_lowercase)
        .map(unconfuse)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disguised_words_are_still_caught() {
        let m = Moderator::parse("spam: \\bbuy now\\b\n", "rules.txt", Policy::Refuse).unwrap();
        for disguised in [
            "ＢＵＹ ＮＯＷ",                      // fullwidth
            "b\u{200B}uy n\u{200D}ow",            // zero-width characters
            "bսy nоw".replace('ս', "u").as_str(), // Cyrillic о
            "buy\u{00AD} now",                    // soft hyphen
            "𝐛𝐮𝐲 𝐧𝐨𝐰",                            // mathematical bold
            "вuy now",                            // Cyrillic в for b
        ] {
            assert!(m.check(disguised).flagged, "{disguised:?} got through");
        }
        assert!(!m.check("buying nothing now").flagged);
        assert_eq!(fold("모든 국민은"), "모든 국민은");
        assert_eq!(fold("Buy NOW!"), "buy now!");
    }

    #[test]
    fn rules_match_case_insensitively_and_bad_lines_are_named() {
        let m = Moderator::parse(
            "# comment\n\nviolence: \\bkill (him|her)\\b\nspam: buy now\nviolence: \\bstab\\b\n",
            "rules.txt",
            Policy::Refuse,
        )
        .unwrap();
        assert!(m.active());
        let v = m.check("I will KILL him and stab ... BUY NOW");
        assert!(v.flagged);
        assert_eq!(v.categories, vec!["violence", "spam"]);
        assert!(!m.check("a kind word").flagged);
        let e = Moderator::parse("ok: a\nno colon here\n", "r.txt", Policy::Flag)
            .err()
            .unwrap();
        assert!(e.starts_with("r.txt:2:"), "{e}");
        let e = Moderator::parse("x: (unclosed\n", "r.txt", Policy::Flag)
            .err()
            .unwrap();
        assert!(e.contains("r.txt:1: bad regex"), "{e}");
        let off = Moderator::parse("x: a\n", "r", Policy::Off).unwrap();
        assert!(!off.check("a").flagged);
        assert!("sometimes".parse::<Policy>().is_err());
    }
}

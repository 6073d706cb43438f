//! Document quality filters, after Gopher (Rae et al. 2021, appendix A) and C4 (Raffel et al. 2020),
//! with defaults that suit both long web documents and one-sentence-per-line corpora.

use rustc_hash::FxHashMap;

#[derive(Clone, Debug, serde::Serialize)]
pub struct FilterOptions {
    /// Minimum length in characters (0 disables).
    pub min_chars: usize,
    /// Maximum length in characters (0 disables).
    pub max_chars: usize,
    /// Minimum number of whitespace-separated words (0 disables).
    pub min_words: usize,
    /// Minimum share of letters (any script) among non-space characters (0 disables).
    pub min_letter_ratio: f64,
    /// Maximum share of lines that repeat an earlier line of the document (1 disables).
    pub max_dup_line_ratio: f64,
    /// Maximum share of characters covered by the most frequent repeated word 2-gram (1 disables);
    /// applied to documents of at least [`TOP_BIGRAM_MIN_WORDS`] words, where it is meaningful.
    pub max_top_bigram_ratio: f64,
    /// Maximum share of lines that look like web boilerplate (1 disables).
    pub max_boilerplate_ratio: f64,
    /// FineWeb's line rules for web documents (off by default: a one-line document is all or
    /// nothing to them).
    pub fineweb: bool,
    /// Lower-case words or phrases that drop a document containing them (whole words where
    /// the word is Latin letters and digits, anywhere in the text otherwise).
    pub banned_words: Vec<String>,
}

/// FineWeb's thresholds (datatrove's `FineWebQualityFilter` defaults).
pub const FINEWEB_LINE_PUNCT: f64 = 0.12;
pub const FINEWEB_SHORT_LINE: f64 = 0.67;
pub const FINEWEB_SHORT_LINE_CHARS: usize = 30;
pub const FINEWEB_CHAR_DUP: f64 = 0.01;
pub const FINEWEB_NEWLINE_PER_WORD: f64 = 0.3;
const TERMINAL: &[char] = &['.', '!', '?', '"', '\'', '…', '。', '！', '？', '”', '’'];

impl Default for FilterOptions {
    fn default() -> Self {
        FilterOptions {
            min_chars: 10,
            max_chars: 100_000,
            min_words: 3,
            min_letter_ratio: 0.5,
            max_dup_line_ratio: 0.3,
            max_top_bigram_ratio: 0.2,
            max_boilerplate_ratio: 0.5,
            fineweb: false,
            banned_words: Vec::new(),
        }
    }
}

/// Why a document was dropped; the names are the keys of the report.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    TooShort,
    TooLong,
    TooFewWords,
    FewLetters,
    RepeatedLines,
    RepeatedNgrams,
    Boilerplate,
    /// FineWeb: too few lines end in terminal punctuation.
    LinePunctuation,
    /// FineWeb: most lines are short (navigation, lists).
    ShortLines,
    /// FineWeb: too many characters in repeated lines.
    DuplicateLineChars,
    /// FineWeb: a list more than prose (many line breaks per word).
    ListLike,
    /// Contains a banned word.
    BannedWords,
    /// Its URL is on a blocked domain.
    BlockedUrl,
    /// C4: "lorem ipsum", a curly bracket, or fewer than 5 sentences left after its line rules.
    C4Document,
    /// Not one of the languages asked for, or identified with too little confidence.
    Language,
}

impl DropReason {
    /// Its name in the report (`too_short`, `blocked_url`, ...).
    pub fn key(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    }
}

/// Gopher applies its repeated n-gram criteria to documents of 50 words or more (shorter ones fail
/// its length filter first); in a short sentence one repeated bigram is normal language.
pub const TOP_BIGRAM_MIN_WORDS: usize = 50;

/// Lower-case fragments that mark a line as navigation, legal or cookie boilerplate.
const BOILERPLATE: &[&str] = &[
    "all rights reserved",
    "cookie",
    "privacy policy",
    "terms of use",
    "terms of service",
    "click here",
    "subscribe",
    "sign up",
    "log in",
    "javascript",
    "무단 전재",
    "무단전재",
    "재배포 금지",
    "재배포금지",
    "구독",
    "로그인",
    "저작권자",
];

/// The first filter `text` fails, if any.
pub fn check(text: &str, o: &FilterOptions) -> Option<DropReason> {
    let chars = text.chars().count();
    if o.min_chars > 0 && chars < o.min_chars {
        return Some(DropReason::TooShort);
    }
    if o.max_chars > 0 && chars > o.max_chars {
        return Some(DropReason::TooLong);
    }
    let words: Vec<&str> = text.split_whitespace().collect();
    if o.min_words > 0 && words.len() < o.min_words {
        return Some(DropReason::TooFewWords);
    }
    if o.min_letter_ratio > 0.0 {
        let (mut letters, mut visible) = (0usize, 0usize);
        for c in text.chars().filter(|c| !c.is_whitespace()) {
            visible += 1;
            letters += usize::from(c.is_alphabetic());
        }
        if visible > 0 && (letters as f64) < o.min_letter_ratio * visible as f64 {
            return Some(DropReason::FewLetters);
        }
    }
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if o.max_dup_line_ratio < 1.0 && lines.len() > 1 {
        let mut seen = rustc_hash::FxHashSet::default();
        let dups = lines.iter().filter(|l| !seen.insert(**l)).count();
        if dups as f64 > o.max_dup_line_ratio * lines.len() as f64 {
            return Some(DropReason::RepeatedLines);
        }
    }
    if o.max_top_bigram_ratio < 1.0 && words.len() >= TOP_BIGRAM_MIN_WORDS {
        let mut counts: FxHashMap<(&str, &str), usize> = FxHashMap::default();
        for w in words.windows(2) {
            *counts.entry((w[0], w[1])).or_default() += 1;
        }
        // Only a bigram that repeats counts (Gopher's top n-gram criterion).
        let top = counts
            .iter()
            .filter(|(_, &c)| c > 1)
            .map(|((a, b), &c)| (a.chars().count() + b.chars().count()) * c)
            .max()
            .unwrap_or(0);
        let word_chars: usize = words.iter().map(|w| w.chars().count()).sum();
        if top as f64 > o.max_top_bigram_ratio * word_chars as f64 {
            return Some(DropReason::RepeatedNgrams);
        }
    }
    if o.fineweb && !lines.is_empty() {
        if let Some(r) = fineweb(text, &lines, words.len()) {
            return Some(r);
        }
    }
    if !o.banned_words.is_empty() && banned(text, &o.banned_words) {
        return Some(DropReason::BannedWords);
    }
    if o.max_boilerplate_ratio < 1.0 && !lines.is_empty() {
        let bp = lines
            .iter()
            .filter(|l| {
                let l = l.to_lowercase();
                BOILERPLATE.iter().any(|b| l.contains(b))
            })
            .count();
        if bp as f64 > o.max_boilerplate_ratio * lines.len() as f64 {
            return Some(DropReason::Boilerplate);
        }
    }
    None
}

/// FineWeb's rules, in datatrove's order.
fn fineweb(text: &str, lines: &[&str], words: usize) -> Option<DropReason> {
    let n = lines.len() as f64;
    let punct = lines
        .iter()
        .filter(|l| l.trim_end().ends_with(TERMINAL))
        .count() as f64;
    if punct / n < FINEWEB_LINE_PUNCT {
        return Some(DropReason::LinePunctuation);
    }
    let short = lines
        .iter()
        .filter(|l| l.chars().count() <= FINEWEB_SHORT_LINE_CHARS)
        .count() as f64;
    if short / n > FINEWEB_SHORT_LINE {
        return Some(DropReason::ShortLines);
    }
    let mut seen = rustc_hash::FxHashSet::default();
    let dup_chars: usize = lines
        .iter()
        .filter(|l| !seen.insert(**l))
        .map(|l| l.chars().count())
        .sum();
    let all_chars: usize = lines.iter().map(|l| l.chars().count()).sum();
    if dup_chars as f64 > FINEWEB_CHAR_DUP * all_chars.max(1) as f64 {
        return Some(DropReason::DuplicateLineChars);
    }
    let newlines = text.matches('\n').count() as f64;
    if words > 0 && newlines / words as f64 > FINEWEB_NEWLINE_PER_WORD {
        return Some(DropReason::ListLike);
    }
    None
}

fn banned(text: &str, words: &[String]) -> bool {
    let lower = text.to_lowercase();
    words.iter().any(|w| {
        if !w.chars().all(|c| c.is_ascii_alphanumeric() || c == ' ') {
            return lower.contains(w.as_str());
        }
        // A whole word: no ASCII letter or digit right before or after.
        lower.match_indices(w.as_str()).any(|(i, m)| {
            let before = lower[..i].chars().next_back();
            let after = lower[i + m.len()..].chars().next();
            !before.is_some_and(|c| c.is_ascii_alphanumeric())
                && !after.is_some_and(|c| c.is_ascii_alphanumeric())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_filter_catches_its_case_and_passes_clean_text() {
        let o = FilterOptions::default();
        assert_eq!(
            check(
                "In the beginning, God created the heavens and the earth.",
                &o
            ),
            None
        );
        assert_eq!(
            check(
                "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있다.",
                &o
            ),
            None
        );
        assert_eq!(check("hi", &o), Some(DropReason::TooShort));
        assert_eq!(
            check(&"word ".repeat(30_000), &o),
            Some(DropReason::TooLong)
        );
        assert_eq!(check("two wordsonly", &o), Some(DropReason::TooFewWords));
        assert_eq!(
            check("12 34 56 78 90 !! ## $$", &o),
            Some(DropReason::FewLetters)
        );
        assert_eq!(
            check("same line here\nsame line here\nsame line here\nother", &o),
            Some(DropReason::RepeatedLines)
        );
        let spam = format!("{} and more text", "buy now ".repeat(30));
        assert_eq!(check(&spam, &o), Some(DropReason::RepeatedNgrams));
        // The same repetition in a short sentence is language, not spam.
        assert_eq!(check("buy now buy now cheap things here", &o), None);
        assert_eq!(
            check("Accept all cookies to continue\nPrivacy policy and terms of use\nA real sentence here.", &o),
            Some(DropReason::Boilerplate)
        );
    }

    #[test]
    fn filters_switch_off() {
        let off = FilterOptions {
            min_chars: 0,
            max_chars: 0,
            min_words: 0,
            min_letter_ratio: 0.0,
            max_dup_line_ratio: 1.0,
            max_top_bigram_ratio: 1.0,
            max_boilerplate_ratio: 1.0,
            fineweb: false,
            banned_words: Vec::new(),
        };
        for t in ["hi", "12 34", "buy now buy now buy now", "cookie\ncookie"] {
            assert_eq!(check(t, &off), None, "{t}");
        }
    }
}

#[cfg(test)]
mod web_tests {
    use super::*;

    #[test]
    fn fineweb_rules_and_banned_words() {
        let o = FilterOptions {
            fineweb: true,
            banned_words: vec!["casino".into(), "무료 충전".into()],
            ..Default::default()
        };
        let prose = "The council met on Monday to discuss the budget for next year.\nIt agreed to fund two new schools and repair the bridge.\nThe vote was unanimous.";
        assert_eq!(check(prose, &o), None);
        assert_eq!(
            check(
                "Home\nAbout us\nProducts and services here\nContact\nMenu of the day",
                &o
            ),
            Some(DropReason::LinePunctuation)
        );
        assert_eq!(
            check("Home.\nAbout us.\nProducts.\nContact.\nA much longer line that reads like a sentence.", &o),
            Some(DropReason::ShortLines)
        );
        let dup = format!("{prose}\n{}", prose.lines().next().unwrap());
        assert_eq!(check(&dup, &o), Some(DropReason::DuplicateLineChars));
        assert_eq!(
            check("Play at the Casino tonight and win big money.", &o),
            Some(DropReason::BannedWords)
        );
        assert_eq!(
            check("Occasional casinos are not the banned word itself.", &o),
            None
        );
        // (A one-line Korean sentence is a "short line" to FineWeb: banned words alone here.)
        let words_only = FilterOptions {
            fineweb: false,
            ..o.clone()
        };
        assert_eq!(
            check("지금 가입하면 무료 충전 쿠폰을 드립니다.", &words_only),
            Some(DropReason::BannedWords)
        );
    }
}

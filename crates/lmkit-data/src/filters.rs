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
}

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
        }
    }
}

/// Why a document was dropped; the names are the keys of the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    TooShort,
    TooLong,
    TooFewWords,
    FewLetters,
    RepeatedLines,
    RepeatedNgrams,
    Boilerplate,
    /// Not one of the languages asked for, or identified with too little confidence.
    Language,
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
        };
        for t in ["hi", "12 34", "buy now buy now buy now", "cookie\ncookie"] {
            assert_eq!(check(t, &off), None, "{t}");
        }
    }
}

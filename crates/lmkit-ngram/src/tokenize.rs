//! How a line of text becomes n-gram tokens: whitespace-separated words (KenLM's convention), or
//! characters, where a run of whitespace becomes the token `▁` (as in SentencePiece) so that word
//! boundaries stay visible to a character model (useful for Korean, whose words are long).

/// Token standing for a run of whitespace in character mode.
pub const SPACE_TOKEN: &str = "\u{2581}";

/// Reserved vocabulary entries, always ids 0, 1 and 2.
pub const UNK: &str = "<unk>";
pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Tokenization {
    #[default]
    Words,
    Chars,
}

impl Tokenization {
    pub fn name(self) -> &'static str {
        match self {
            Tokenization::Words => "words",
            Tokenization::Chars => "chars",
        }
    }
}

/// The bytes KenLM's readers treat as spaces (`util::kSpaces`: tab, newline, vertical tab, form
/// feed, carriage return, space): how an ARPA line without lmplz's tab structure is split. A
/// no-break space or another Unicode space stays inside a word.
pub fn is_kenlm_space(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\x0B' | '\x0C' | '\r' | ' ')
}

/// The bytes that separate words when lmplz counts a corpus (`"\0\t\n\r "` in its
/// corpus_count.cc): fewer than [`is_kenlm_space`] — a vertical tab, a form feed or a Unicode
/// space stays inside a word there, and so in lmkit's word tokens, when training and scoring.
pub fn is_lmplz_delimiter(c: char) -> bool {
    matches!(c, '\0' | '\t' | '\n' | '\r' | ' ')
}

/// The fields of `line` between KenLM spaces (see [`is_kenlm_space`]).
pub fn kenlm_fields(line: &str) -> impl Iterator<Item = &str> {
    line.split(is_kenlm_space).filter(|w| !w.is_empty())
}

/// Calls `f` for each token of `line`, in order, without allocating.
pub fn for_each_token<'a>(line: &'a str, mode: Tokenization, mut f: impl FnMut(&'a str)) {
    match mode {
        Tokenization::Words => line
            .split(is_lmplz_delimiter)
            .filter(|w| !w.is_empty())
            .for_each(f),
        Tokenization::Chars => {
            let line = line.trim();
            let mut in_space = false;
            for (i, c) in line.char_indices() {
                if c.is_whitespace() {
                    if !in_space {
                        f(SPACE_TOKEN);
                    }
                    in_space = true;
                } else {
                    in_space = false;
                    f(&line[i..i + c.len_utf8()]);
                }
            }
        }
    }
}

/// The tokens of `line` as a vector.
pub fn tokens(line: &str, mode: Tokenization) -> Vec<&str> {
    let mut out = Vec::new();
    for_each_token(line, mode, |t| out.push(t));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_on_spaces_tabs_and_line_ends_only_as_lmplz_does() {
        assert_eq!(
            tokens("  a\tb  c \x0b\x0cd\r\n", Tokenization::Words),
            vec!["a", "b", "c", "\x0b\x0cd"]
        );
        // A no-break space and an ideographic space stay inside their words.
        assert_eq!(
            tokens("x\u{a0}y z\u{3000}w", Tokenization::Words),
            vec!["x\u{a0}y", "z\u{3000}w"]
        );
    }

    #[test]
    fn chars_mark_word_boundaries_once() {
        assert_eq!(
            tokens(" 나는  버스 ", Tokenization::Chars),
            vec!["나", "는", SPACE_TOKEN, "버", "스"]
        );
    }
}

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

/// Calls `f` for each token of `line`, in order, without allocating.
pub fn for_each_token<'a>(line: &'a str, mode: Tokenization, mut f: impl FnMut(&'a str)) {
    match mode {
        Tokenization::Words => line.split_whitespace().for_each(f),
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
    fn words_split_on_any_whitespace() {
        assert_eq!(
            tokens("  a\tb  c \n", Tokenization::Words),
            vec!["a", "b", "c"]
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

//! C4's rules for web text (Raffel et al. 2020, as datatrove's `C4QualityFilter` applies them):
//! lines are removed when they do not end in terminal punctuation, have fewer than 3 words, hold
//! a word over 1,000 characters, mention JavaScript or a policy page; documents are dropped when
//! they contain "lorem ipsum" or a curly bracket, or keep fewer than 5 sentences.

use crate::DropReason;

const MIN_WORDS_PER_LINE: usize = 3;
const MAX_WORD_CHARS: usize = 1000;
const MIN_SENTENCES: usize = 5;
const END: &[char] = &['.', '!', '?', '"', '\'', '。', '！', '？', '”', '’'];
const POLICY: &[&str] = &[
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
];

/// The document with C4's line rules applied, or why it is dropped; also how many lines went.
pub fn apply(text: &str) -> Result<(String, usize), DropReason> {
    let lower = text.to_lowercase();
    if lower.contains("lorem ipsum") || text.contains('{') {
        return Err(DropReason::C4Document);
    }
    let mut kept = Vec::new();
    let mut removed = 0;
    for line in text.lines() {
        let l = line.trim();
        if l.is_empty() {
            continue;
        }
        let ll = l.to_lowercase();
        let words: Vec<&str> = l.split_whitespace().collect();
        let bad = !l.ends_with(END)
            || words.len() < MIN_WORDS_PER_LINE
            || words.iter().any(|w| w.chars().count() > MAX_WORD_CHARS)
            || ll.contains("javascript")
            || POLICY.iter().any(|p| ll.contains(p));
        if bad {
            removed += 1;
        } else {
            kept.push(l);
        }
    }
    let out = kept.join("\n");
    // Sentences: runs ending in terminal punctuation.
    let sentences = out
        .split_inclusive(END)
        .filter(|s| s.trim().chars().any(char::is_alphanumeric))
        .count();
    if sentences < MIN_SENTENCES {
        return Err(DropReason::C4Document);
    }
    Ok((out, removed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_documents() {
        let page = "Home | About | Contact\n\
                    The museum opened in 1998. It holds 3,000 paintings. Entry is free on Sundays.\n\
                    Please enable JavaScript to view the map.\n\
                    Read our privacy policy.\n\
                    Guided tours start at ten. They last an hour. Book at the desk.\n\
                    Share";
        let (out, removed) = apply(page).unwrap();
        assert_eq!(
            out,
            "The museum opened in 1998. It holds 3,000 paintings. Entry is free on Sundays.\n\
             Guided tours start at ten. They last an hour. Book at the desk."
        );
        assert_eq!(removed, 4);
        assert_eq!(
            apply("Lorem ipsum dolor sit amet. A. B. C. D."),
            Err(DropReason::C4Document)
        );
        assert_eq!(
            apply("function f() { return 1; } is code. A. B. C. D."),
            Err(DropReason::C4Document)
        );
        assert_eq!(
            apply("One sentence only here."),
            Err(DropReason::C4Document)
        );
    }
}

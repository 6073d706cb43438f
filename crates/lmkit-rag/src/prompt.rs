//! Grounded prompts: the retrieved chunks as numbered sources in the user message, and a system
//! message that asks for answers from them, cited by number.

/// The default system message of `lmkit rag ask` and of retrieval in `lmkit serve`.
pub const SYSTEM: &str = "Answer the question using only the numbered sources below. \
Cite the sources you use by their number in brackets, like [1]. \
If the sources do not contain the answer, say that you do not know.";

/// A retrieved chunk as the prompt shows it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Source {
    /// 1-based, as cited.
    pub number: usize,
    pub source: String,
    pub lines: [usize; 2],
    pub text: String,
    pub score: f32,
}

impl Source {
    /// `path, lines a–b` (or `line a`).
    pub fn label(&self) -> String {
        if self.lines[0] == self.lines[1] {
            format!("{}, line {}", self.source, self.lines[0])
        } else {
            format!("{}, lines {}–{}", self.source, self.lines[0], self.lines[1])
        }
    }
}

/// The user message: the sources, then the question.
pub fn user_message(question: &str, sources: &[Source]) -> String {
    let mut s = String::from("Sources:\n");
    for src in sources {
        s.push_str(&format!(
            "\n[{}] {}\n{}\n",
            src.number,
            src.label(),
            src.text.trim()
        ));
    }
    s.push_str(&format!("\nQuestion: {}", question.trim()));
    s
}

/// Search results as numbered sources.
pub fn sources(found: &[crate::index::Found]) -> Vec<Source> {
    found
        .iter()
        .enumerate()
        .map(|(i, f)| Source {
            number: i + 1,
            source: f.source.clone(),
            lines: f.lines,
            text: f.text.clone(),
            score: f.score,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_sources_then_question() {
        let s = vec![
            Source {
                number: 1,
                source: "a.txt".into(),
                lines: [3, 5],
                text: "Alpha.".into(),
                score: 0.9,
            },
            Source {
                number: 2,
                source: "b.txt".into(),
                lines: [7, 7],
                text: "Beta.".into(),
                score: 0.5,
            },
        ];
        assert_eq!(
            user_message("What?", &s),
            "Sources:\n\n[1] a.txt, lines 3–5\nAlpha.\n\n[2] b.txt, line 7\nBeta.\n\nQuestion: What?"
        );
    }
}

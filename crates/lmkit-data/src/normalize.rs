//! Text normalization: Unicode NFKC, line endings, control and zero-width characters, whitespace,
//! and (optionally) dates.

use unicode_normalization::UnicodeNormalization;

#[derive(Clone, Debug, serde::Serialize)]
pub struct NormalizeOptions {
    pub nfkc: bool,
    pub dates: bool,
    /// Repair UTF-8 that was read as Windows-1252 first (see [`crate::mojibake`]).
    pub fix_mojibake: bool,
}

impl Default for NormalizeOptions {
    fn default() -> Self {
        NormalizeOptions {
            nfkc: true,
            dates: false,
            fix_mojibake: false,
        }
    }
}

/// The normalized text and the number of dates rewritten.
pub fn normalize(text: &str, opts: &NormalizeOptions) -> (String, usize) {
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    let text: String = if opts.nfkc {
        text.nfkc().collect()
    } else {
        text
    };
    let mut out = String::with_capacity(text.len());
    let mut blank_run = 0;
    for line in text.split('\n') {
        let mut clean = String::with_capacity(line.len());
        let mut space = false;
        for c in line.chars() {
            if matches!(
                c,
                '\u{200B}' | '\u{200C}' | '\u{200D}' | '\u{2060}' | '\u{FEFF}' | '\u{00AD}'
            ) {
                continue; // zero-width characters and soft hyphens carry no text
            }
            if c.is_whitespace() {
                space = true;
            } else if c.is_control() {
                continue;
            } else {
                if space && !clean.is_empty() {
                    clean.push(' ');
                }
                space = false;
                clean.push(c);
            }
        }
        if clean.is_empty() {
            blank_run += 1;
            continue;
        }
        if !out.is_empty() {
            // Keep at most one blank line between paragraphs.
            out.push_str(if blank_run > 0 { "\n\n" } else { "\n" });
        }
        blank_run = 0;
        out.push_str(&clean);
    }
    if opts.dates {
        crate::dates::normalize_dates(&out)
    } else {
        (out, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nfkc_whitespace_and_controls() {
        let o = NormalizeOptions::default();
        assert_eq!(normalize("ｆｕｌｌ\u{3000}width　①", &o).0, "full width 1");
        assert_eq!(
            normalize("  a\t\tb \u{200B}c\u{0007}  \r\n\r\n\r\n d ", &o).0,
            "a b c\n\nd"
        );
        assert_eq!(normalize("x\ny", &o).0, "x\ny");
        // Korean compatibility jamo and precomposed syllables survive NFKC as syllables.
        assert_eq!(normalize("한국어", &o).0, "한국어");
    }
}

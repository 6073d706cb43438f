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

/// Hangul syllables: NFKC as they are, with no canonical combining class.
const HANGUL: std::ops::RangeInclusive<char> = '\u{AC00}'..='\u{D7A3}';

/// Dashes and curly quotes: NFKC as they are, and common in prose.
fn stable_punctuation(c: char) -> bool {
    matches!(
        c,
        '\u{2013}' | '\u{2014}' | '\u{2018}' | '\u{2019}' | '\u{201C}' | '\u{201D}'
    )
}

/// Characters NFKC leaves as they are whatever surrounds them: ASCII, Hangul syllables, dashes
/// and curly quotes are starters (canonical combining class 0) without decompositions, and never
/// the second character of a composition.
fn stable(c: char) -> bool {
    c.is_ascii() || HANGUL.contains(&c) || stable_punctuation(c)
}

/// NFKC of `text`, computed only where it can change anything: the text splits before every
/// [`stable`] character into pieces that normalize on their own (nothing reorders across a
/// starter or composes into one that follows), so each run of other characters, with the stable
/// character before it (which a combining mark may compose with), is checked — Unicode's quick
/// check — and normalized if it must be; the rest is copied. `None`: the text is in NFKC.
fn nfkc(text: &str) -> Option<String> {
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut at = 0;
    while let Some(k) = text[at..].find(|c: char| !stable(c)).map(|k| at + k) {
        let end = text[k..].find(stable).map_or(text.len(), |e| k + e);
        let start = text[..k]
            .chars()
            .next_back()
            .map_or(k, |c| k - c.len_utf8());
        let piece = &text[start..end];
        at = end;
        if unicode_normalization::is_nfkc_quick(piece.chars())
            == unicode_normalization::IsNormalized::Yes
        {
            continue;
        }
        let o = out.get_or_insert_with(|| String::with_capacity(text.len() + 16));
        o.push_str(&text[copied..start]);
        o.extend(piece.nfkc());
        copied = end;
    }
    out.map(|mut o| {
        o.push_str(&text[copied..]);
        o
    })
}

/// Characters that are never whitespace, controls or zero-width: copied through in runs.
fn plain(c: char) -> bool {
    ('\u{21}'..='\u{7E}').contains(&c)
        || HANGUL.contains(&c)
        || ('\u{4E00}'..='\u{9FFF}').contains(&c)
        || ('\u{3041}'..='\u{30FF}').contains(&c)
        || stable_punctuation(c)
}

/// Whether the character at byte `k` of `line` is [`plain`] (false at the end).
fn plain_at(line: &str, k: usize) -> bool {
    match line.as_bytes().get(k) {
        Some(&b) if b < 0x80 => (0x21..0x7f).contains(&b),
        Some(_) => line[k..].chars().next().is_some_and(plain),
        None => false,
    }
}

/// Zero-width characters and soft hyphens: removed, they carry no text.
fn zero_width(c: char) -> bool {
    matches!(
        c,
        '\u{200B}' | '\u{200C}' | '\u{200D}' | '\u{2060}' | '\u{FEFF}' | '\u{00AD}'
    )
}

/// Whether [`normalize`] (before dates) gives `text` back as it is: no carriage return, in NFKC
/// (when asked), and every line already trimmed, with single spaces, no other whitespace,
/// controls or zero-width characters, and at most one blank line in a row, none first or last.
/// One pass over the bytes; it may say no to text that would not change, never yes to text that
/// would.
fn is_normalized(text: &str, nfkc: bool) -> bool {
    let b = text.as_bytes();
    let n = b.len();
    // Spaces first or last in a line: at the ends here, beside line ends below.
    if b.first() == Some(&b' ') || b.last() == Some(&b' ') {
        return false;
    }
    let mut i = 0;
    while i < n {
        // Eight bytes at a time while they are printable ASCII and spaces, none beside another.
        let mut space_before = i > 0 && b[i - 1] == b' ';
        while i + 8 <= n {
            let (outside, spaces) = printable_and_spaces(crate::swar::load(b, i));
            // The bytes before the first one outside (all eight when none is).
            let inside = outside.trailing_zeros() / 8;
            let spaces = spaces & u64::MAX.checked_shr(64 - 8 * inside).unwrap_or(0);
            if spaces & ((spaces << 8) | u64::from(space_before) << 7) != 0 {
                return false;
            }
            if inside < 8 {
                i += inside as usize;
                break;
            }
            space_before = spaces >> 63 != 0;
            i += 8;
        }
        if i >= n {
            break;
        }
        let c = b[i];
        if (0x21..0x7f).contains(&c) {
            i += 1;
            continue;
        }
        // Three-byte characters that are stable as they are: Hangul syllables, dashes and curly
        // quotes (decoded here without the general path's look back).
        if (0xE0..=0xEF).contains(&c) && i + 3 <= n {
            let ch = (u32::from(c & 0x0F) << 12)
                | (u32::from(b[i + 1] & 0x3F) << 6)
                | u32::from(b[i + 2] & 0x3F);
            if char::from_u32(ch).is_some_and(stable) {
                i += 3;
                continue;
            }
        }
        match c {
            b' ' => {
                // Not first or last in a line, not beside another space.
                let before = i.checked_sub(1).map(|k| b[k]);
                if matches!(before, None | Some(b' ' | b'\n'))
                    || matches!(b.get(i + 1), None | Some(b' ' | b'\n'))
                {
                    return false;
                }
                i += 1;
            }
            b'\n' => {
                // Not first or last, never a third in a row (two blank lines), no space beside.
                if i == 0
                    || i + 1 == n
                    || b[i - 1] == b' '
                    || b[i + 1] == b' '
                    || (i >= 2 && b[i - 1] == b'\n' && b[i - 2] == b'\n')
                {
                    return false;
                }
                i += 1;
            }
            0..0x80 => return false, // controls, tabs, carriage returns
            _ => {
                // A run of characters other than the stable ones, checked as `nfkc` checks it:
                // with the character before it.
                let start = text[..i]
                    .chars()
                    .next_back()
                    .map_or(i, |p| i - p.len_utf8());
                let mut end = i;
                for ch in text[i..].chars() {
                    if stable(ch) {
                        break;
                    }
                    if ch.is_whitespace() || ch.is_control() || zero_width(ch) {
                        return false;
                    }
                    end += ch.len_utf8();
                }
                if end == i {
                    i += text[i..].chars().next().map_or(1, char::len_utf8);
                    continue;
                }
                if nfkc
                    && unicode_normalization::is_nfkc_quick(text[start..end].chars())
                        != unicode_normalization::IsNormalized::Yes
                {
                    return false;
                }
                i = end;
            }
        }
    }
    true
}

/// For eight bytes (little-endian `w`): those outside printable ASCII and space (0x20..=0x7E) —
/// the first exactly, as the high bit of its byte — and the spaces, exactly.
fn printable_and_spaces(w: u64) -> (u64, u64) {
    use crate::swar::{equal, HIGH, ONES};
    // A byte from 0x20 to 0x7E: no high bit in it, in it less 0x20 (else it borrows) or in it
    // plus one (0x7F gives one). Carries and borrows start only at bytes outside.
    let outside = (w | w.wrapping_sub(ONES * 0x20) | w.wrapping_add(ONES)) & HIGH;
    (outside, equal(w, b' '))
}

/// [`normalize`] of an owned text: the normalized text, whether it differs from `text`, and the
/// number of dates rewritten. Text that is clean already (most of it) comes back as it is, with
/// no copy, when dates are not to be rewritten.
pub fn normalize_owned(text: String, opts: &NormalizeOptions) -> (String, bool, usize) {
    if !opts.dates && is_normalized(&text, opts.nfkc) {
        return (text, false, 0);
    }
    let (out, dates) = normalize(&text, opts);
    let changed = out != text;
    (out, changed, dates)
}

/// The normalized text and the number of dates rewritten.
pub fn normalize(text: &str, opts: &NormalizeOptions) -> (String, usize) {
    let text: std::borrow::Cow<str> = if text.contains('\r') {
        text.replace("\r\n", "\n").replace('\r', "\n").into()
    } else {
        text.into()
    };
    // Most text is in NFKC already: the quick check spares composing it again.
    let text: std::borrow::Cow<str> = match opts.nfkc.then(|| nfkc(&text)).flatten() {
        Some(normalized) => normalized.into(),
        None => text,
    };
    // Lines already clean (often all that NFKC left to do): no second copy.
    let out = if is_normalized(&text, false) {
        text.into_owned()
    } else {
        clean_lines(&text)
    };
    if opts.dates {
        crate::dates::normalize_dates(&out)
    } else {
        (out, 0)
    }
}

/// Trims lines, makes each run of whitespace one space, removes controls and zero-width
/// characters, and keeps at most one blank line between paragraphs.
fn clean_lines(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank_run = 0;
    for line in text.split('\n') {
        // Keep at most one blank line between paragraphs.
        let start = out.len();
        if !out.is_empty() {
            out.push_str(if blank_run > 0 { "\n\n" } else { "\n" });
        }
        let content = out.len();
        let mut space = false;
        let bytes = line.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            // A run of plain characters goes in as it is: printable ASCII found byte by byte,
            // then Hangul, kana and CJK ideographs, and single spaces between them (which stay
            // as they are).
            let mut run = 0;
            loop {
                let ascii = bytes[i + run..]
                    .iter()
                    .position(|&b| !(0x21..0x7f).contains(&b))
                    .unwrap_or(bytes.len() - i - run);
                run += ascii;
                let more: usize = line[i + run..]
                    .chars()
                    .take_while(|&c| !c.is_ascii() && plain(c))
                    .map(char::len_utf8)
                    .sum();
                run += more;
                let at = i + run;
                if run > 0 && bytes.get(at) == Some(&b' ') && plain_at(line, at + 1) {
                    run += 1;
                    continue;
                }
                if ascii == 0 && more == 0 || at == bytes.len() {
                    break;
                }
            }
            if run > 0 {
                if space && out.len() > content {
                    out.push(' ');
                }
                space = false;
                out.push_str(&line[i..i + run]);
                i += run;
                continue;
            }
            let c = line[i..].chars().next().unwrap_or_default();
            i += c.len_utf8();
            if zero_width(c) {
                continue;
            }
            if c.is_whitespace() {
                space = true;
            } else if c.is_control() {
                continue;
            } else {
                if space && out.len() > content {
                    out.push(' ');
                }
                space = false;
                out.push(c);
            }
        }
        if out.len() == content {
            out.truncate(start);
            blank_run += 1;
        } else {
            blank_run = 0;
        }
    }
    out
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
        // Runs of plain ASCII between spaces, controls and other scripts.
        assert_eq!(
            normalize("\u{1F}a  bc\u{7F}d\u{A0}é\u{200B}f\u{3000} 가\t", &o).0,
            "a bcd éf 가"
        );
        assert_eq!(normalize("e\u{301}", &o).0, "é");
        let raw = NormalizeOptions {
            nfkc: false,
            ..Default::default()
        };
        assert_eq!(normalize("ｆｕｌｌ e\u{301}", &raw).0, "ｆｕｌｌ e\u{301}");
    }

    /// Normalizing only the pieces that need it gives NFKC of the whole text: combining marks
    /// after ASCII letters and Hangul syllables, marks to reorder, jamo to compose, compatibility
    /// characters, next to the characters taken as stable.
    #[test]
    fn nfkc_in_pieces_equals_nfkc_of_the_whole() {
        let pieces = [
            "e",
            "<",
            "=",
            "A",
            " ",
            "가",
            "각",
            "\u{1100}",
            "\u{1161}",
            "\u{11A8}",
            "\u{0301}",
            "\u{0323}",
            "\u{0338}",
            "\u{0327}",
            "\u{212B}",
            "\u{2026}",
            "\u{FB01}",
            "ｆ",
            "①",
            "\u{3000}",
            "\u{00B7}",
            "\u{2019}",
            "\u{2014}",
            "\u{1E31}",
            "\u{F900}",
            "\u{3131}",
            "\u{AC00}\u{11A8}",
            "\u{0644}\u{0627}",
            "\u{FDFA}",
            "\u{1D400}",
            "\u{0345}",
            "漢",
        ];
        for text in random_texts(&pieces, 11, 50_000, 10) {
            let whole: String = text.nfkc().collect();
            let got = nfkc(&text).unwrap_or_else(|| text.clone());
            assert_eq!(got, whole, "{text:?}");
        }
    }

    /// `count` texts of fewer than `most` pieces each, drawn with `seed`.
    fn random_texts<'a>(
        pieces: &'a [&str],
        seed: u64,
        count: usize,
        most: u64,
    ) -> impl Iterator<Item = String> + 'a {
        use lmkit_core::rng::Random;
        let mut rng = lmkit_core::rng::SplitMix64::new(seed);
        (0..count).map(move |_| {
            let n = (rng.next_u64() % most) as usize;
            (0..n)
                .map(|_| pieces[(rng.next_u64() % pieces.len() as u64) as usize])
                .collect()
        })
    }

    /// The definition, one character at a time: what the run-by-run loop must equal.
    fn by_chars(text: &str) -> String {
        let text: String = text
            .replace("\r\n", "\n")
            .replace('\r', "\n")
            .nfkc()
            .collect();
        let mut lines = Vec::new();
        let mut blank_run = 0;
        for line in text.split('\n') {
            let mut clean = String::new();
            let mut space = false;
            for c in line.chars() {
                if matches!(
                    c,
                    '\u{200B}' | '\u{200C}' | '\u{200D}' | '\u{2060}' | '\u{FEFF}' | '\u{00AD}'
                ) {
                    continue;
                }
                if c.is_whitespace() {
                    space = true;
                } else if !c.is_control() {
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
            if !lines.is_empty() {
                lines.push(if blank_run > 0 { "\n\n" } else { "\n" }.to_string());
            }
            blank_run = 0;
            lines.push(clean);
        }
        lines.concat()
    }

    /// Pieces of text for the random tests: every kind of character `normalize` treats apart.
    const MIXED: &[&str] = &[
        "a",
        "Bc",
        " ",
        "  ",
        "\t",
        "\n",
        "\r\n",
        "\r",
        "\u{7}",
        "\u{7F}",
        "\u{A0}",
        "é",
        "e\u{301}",
        "\u{200B}",
        "\u{AD}",
        "가",
        "ｆ",
        "①",
        "\u{3000}",
        "\u{85}",
        ".",
        "\n\n\n",
        "한국어",
        "“q”",
        "\u{2026}",
        "—",
        "\u{11A8}",
        "\u{1100}",
        "\u{1161}",
        "漢字",
        "かな",
        "・",
        "\u{FF61}",
        "\u{2000}",
    ];

    #[test]
    fn runs_equal_the_character_definition() {
        for text in random_texts(MIXED, 3, 20_000, 12) {
            assert_eq!(
                normalize(&text, &NormalizeOptions::default()).0,
                by_chars(&text),
                "{text:?}"
            );
        }
    }

    /// Text said to be clean comes back as it is, and the owned path gives what `normalize`
    /// gives: random texts, and the normalized ones (clean, so most take the short path).
    #[test]
    fn clean_text_is_returned_as_it_is() {
        let mut clean = 0;
        for nfkc in [true, false] {
            let o = NormalizeOptions {
                nfkc,
                ..Default::default()
            };
            let short = random_texts(MIXED, 5, 20_000, 12);
            for text in short.chain(random_texts(MIXED, 6, 5_000, 60)) {
                let (once, _) = normalize(&text, &o);
                for t in [text, once] {
                    let (want, _) = normalize(&t, &o);
                    if is_normalized(&t, nfkc) {
                        assert_eq!(want, t, "{t:?}");
                        clean += 1;
                    }
                    let (got, changed, _) = normalize_owned(t.clone(), &o);
                    assert_eq!(got, want, "{t:?}");
                    assert_eq!(changed, want != t, "{t:?}");
                }
            }
        }
        // Most normalized texts are recognized as such.
        assert!(clean > 30_000, "{clean}");
    }

    /// The eight-byte test agrees with the byte-by-byte one, bytes at each edge of its ranges.
    #[test]
    fn eight_bytes_at_a_time() {
        use lmkit_core::rng::Random;
        let edges = [
            0x00, 0x01, 0x1F, 0x20, 0x21, b'a', 0x7E, 0x7F, 0x80, 0xA0, 0xFF,
        ];
        let mut rng = lmkit_core::rng::SplitMix64::new(9);
        for _ in 0..200_000 {
            let bytes: [u8; 8] =
                std::array::from_fn(|_| edges[(rng.next_u64() % edges.len() as u64) as usize]);
            let first_outside = bytes.iter().position(|b| !(0x20..0x7F).contains(b));
            let spaces: u64 = bytes
                .iter()
                .enumerate()
                .filter(|(_, &b)| b == b' ')
                .map(|(k, _)| 0x80u64 << (8 * k))
                .sum();
            let (outside, got_spaces) = printable_and_spaces(u64::from_le_bytes(bytes));
            assert_eq!(got_spaces, spaces, "{bytes:?}");
            assert_eq!(
                (outside.trailing_zeros() / 8) as usize,
                first_outside.unwrap_or(8),
                "{bytes:?}"
            );
        }
    }
}

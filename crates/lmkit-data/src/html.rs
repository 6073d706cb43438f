//! HTML → main text: boilerplate (navigation, sidebars, footers, cookie banners, share buttons,
//! comments) removed by the `trafilatura` crate (a port of go-trafilatura, itself of Python's
//! trafilatura), then the kept markup turned into plain text with one line per block (paragraph,
//! heading, list item, table row), so line-based filters (C4, Gopher) see the page's structure.

use scraper::{ElementRef, Html, Node};

/// Elements whose content starts and ends a line.
const BLOCKS: &[&str] = &[
    "address",
    "article",
    "aside",
    "blockquote",
    "caption",
    "dd",
    "details",
    "div",
    "dl",
    "dt",
    "figcaption",
    "figure",
    "footer",
    "form",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "header",
    "hr",
    "li",
    "main",
    "nav",
    "ol",
    "p",
    "pre",
    "section",
    "summary",
    "table",
    "tbody",
    "thead",
    "tfoot",
    "tr",
    "ul",
];

/// Elements whose cells are separated by a tab-like gap on their row.
const CELLS: &[&str] = &["td", "th"];

/// The main text of an HTML page, or `None` when the extractor finds none (a page of links only,
/// an empty body). Text is whitespace-collapsed except inside `<pre>`.
///
/// The extractor replaces a main text shorter than 250 characters by its "baseline" (all the
/// article's text as one paragraph), which loses the lines of short pages — every short Korean
/// article among them. So the main text is taken as found, however short, and the baseline is
/// asked for only when nothing was found.
pub fn main_text(html: &str) -> Option<String> {
    let mut as_found = trafilatura::Options::default();
    let mut config = trafilatura::Config::default();
    config.min_extracted_size = 0;
    as_found.config = config;
    for opts in [as_found, trafilatura::Options::default()] {
        let Ok(extracted) = trafilatura::extract(html, &opts) else {
            continue;
        };
        let text = blocks_to_text(&extracted.content_html);
        if !text.is_empty() {
            return Some(text);
        }
    }
    None
}

/// Plain text of an HTML fragment: block elements on lines of their own.
pub fn blocks_to_text(fragment: &str) -> String {
    let doc = Html::parse_fragment(fragment);
    let mut out = Writer::default();
    out.element(doc.root_element(), false);
    out.finish()
}

#[derive(Default)]
struct Writer {
    lines: Vec<String>,
    line: String,
    /// A space is owed before the next word on this line.
    space: bool,
}

impl Writer {
    fn element(&mut self, el: ElementRef<'_>, pre: bool) {
        let name = el.value().name();
        if matches!(name, "script" | "style" | "noscript" | "template") {
            return;
        }
        let block = BLOCKS.contains(&name);
        let pre = pre || name == "pre";
        if block {
            self.end_line();
        }
        if name == "br" {
            self.end_line();
        }
        if CELLS.contains(&name) && !self.line.is_empty() {
            self.line.push_str(" | ");
            self.space = false;
        }
        for child in el.children() {
            match child.value() {
                Node::Text(t) => self.text(t, pre),
                Node::Element(_) => {
                    if let Some(e) = ElementRef::wrap(child) {
                        self.element(e, pre);
                    }
                }
                _ => {}
            }
        }
        if block {
            self.end_line();
        }
    }

    fn text(&mut self, t: &str, pre: bool) {
        if pre {
            for (i, part) in t.split('\n').enumerate() {
                if i > 0 {
                    self.end_line();
                }
                self.line.push_str(part.trim_end());
            }
            return;
        }
        if t.starts_with(char::is_whitespace) {
            self.space = true;
        }
        for word in t.split_whitespace() {
            if self.space && !self.line.is_empty() {
                self.line.push(' ');
            }
            self.line.push_str(word);
            self.space = true;
        }
        self.space = t.ends_with(char::is_whitespace) && !self.line.is_empty();
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.line);
        let line = line.trim();
        if !line.is_empty() {
            self.lines.push(line.to_string());
        }
        self.space = false;
    }

    fn finish(mut self) -> String {
        self.end_line();
        self.lines.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_become_lines_and_inline_text_joins() {
        let t = blocks_to_text(
            "<h1>Title</h1><p>One <b>bold</b>\n  word,<a href=x>link</a>.</p>\
             <ul><li>a</li><li>b<br>c</li></ul><table><tr><td>x</td><td>y</td></tr></table>\
             <pre>  code\n    indented</pre><script>no()</script>",
        );
        assert_eq!(
            t,
            "Title\nOne bold word,link.\na\nb\nc\nx | y\ncode\nindented"
        );
    }

    #[test]
    fn boilerplate_is_removed() {
        let page = "<html><head><title>T</title><script>var x = 1;</script></head><body>\
            <nav><a href=/>Home</a> <a href=/news>News</a></nav>\
            <article><h1>Otters are back</h1>\
            <p>After an absence of almost forty years, river otters have been seen again along \
            the lower reaches of the river, according to volunteers who survey its banks.</p>\
            <p>A night camera near the old mill recorded a female with two cubs in late April, \
            and fresh tracks were found at eleven of the twenty sites the team visits.</p></article>\
            <footer>Copyright 2026. All rights reserved.</footer></body></html>";
        let t = main_text(page).unwrap();
        assert!(t.starts_with("Otters are back\nAfter an absence"), "{t}");
        assert!(t.contains("\nA night camera"), "{t}");
        assert!(!t.contains("Copyright") && !t.contains("News"), "{t}");
    }
}

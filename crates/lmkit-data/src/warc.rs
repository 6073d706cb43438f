//! WARC and WET files (ISO 28500, as Common Crawl writes them): records are read one at a time
//! from the (already decompressed) stream. `response` records holding an HTML page become the
//! page's main text ([`crate::html`]); WET `conversion` records are text already; `resource`
//! records of HTML are extracted too. Request, metadata, warcinfo and revisit records are not
//! documents and are passed over.

use std::io::{BufRead, Read};

/// Records larger than this are passed over (counted), never held in memory.
pub const MAX_RECORD: u64 = 64 << 20;

/// One record's header fields that matter here, and its content block.
#[derive(Debug)]
pub struct Record {
    /// 1-based position in the file.
    pub number: u64,
    pub kind: String,
    pub uri: Option<String>,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
    /// Content-Length was over [`MAX_RECORD`]: the body was skipped.
    pub too_large: bool,
    /// Bytes of the file this record took (header and content).
    pub bytes: u64,
}

/// What a record gives.
pub enum Content {
    /// The text of a document.
    Text(String),
    /// Not a document (request, metadata, warcinfo, revisit...).
    Ignored,
    /// A page that gives no document, and why (kind, detail).
    Skipped(&'static str, String),
}

/// The longest record header taken (a line of it included: a file without line ends, not WARC
/// at all, is not gathered whole as one line).
const MAX_HEADER: usize = 1 << 20;

/// One line of record `number`'s header into `line` (cleared first); its length, 0 at the end.
fn read_line(mut r: &mut dyn BufRead, line: &mut Vec<u8>, number: u64) -> Result<usize, String> {
    line.clear();
    lmkit_core::read_line_within(&mut r, line, MAX_HEADER).map_err(|e| {
        if line.len() > MAX_HEADER {
            format!("record {number}: header longer than 1 MiB")
        } else {
            format!("read failed: {e}")
        }
    })
}

/// Reads the next record (the `number`-th, named in errors), `Ok(None)` at the end. Errors say
/// what is malformed.
pub fn next_record(r: &mut dyn BufRead, number: u64) -> Result<Option<Record>, String> {
    let mut line = Vec::new();
    // Records are separated by blank lines; skip any before the version line.
    loop {
        let n = read_line(r, &mut line, number)?;
        if n == 0 {
            return Ok(None);
        }
        if !line.iter().all(u8::is_ascii_whitespace) {
            break;
        }
    }
    if !line.starts_with(b"WARC/") {
        let shown = String::from_utf8_lossy(&line[..line.len().min(40)]).into_owned();
        return Err(format!(
            "record {number}: expected a `WARC/1.x` version line, found {:?}",
            shown.trim_end()
        ));
    }
    let mut kind = String::new();
    let mut uri = None;
    let mut content_type = None;
    let mut length: Option<u64> = None;
    let mut header_bytes = line.len();
    loop {
        let n = read_line(r, &mut line, number)?;
        if n == 0 {
            return Err(format!("record {number}: the file ends inside its header"));
        }
        header_bytes += n;
        if header_bytes > MAX_HEADER {
            return Err(format!("record {number}: header longer than 1 MiB"));
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        if text.is_empty() {
            break;
        }
        let Some((name, value)) = text.split_once(':') else {
            continue; // tolerated, as other readers do
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "warc-type" => kind = value.to_ascii_lowercase(),
            "warc-target-uri" => uri = Some(value.trim_matches(['<', '>']).to_string()),
            "content-type" => content_type = Some(value.to_string()),
            "content-length" => {
                length = Some(value.parse().map_err(|_| {
                    format!("record {number}: Content-Length {value:?} is not a number")
                })?)
            }
            _ => {}
        }
    }
    let length = length.ok_or_else(|| format!("record {number}: no Content-Length field"))?;
    let too_large = length > MAX_RECORD;
    let mut body = Vec::new();
    if too_large {
        let skipped = std::io::copy(&mut r.take(length), &mut std::io::sink())
            .map_err(|e| format!("read failed: {e}"))?;
        if skipped < length {
            return Err(format!("record {number}: the file ends inside its content"));
        }
    } else {
        r.take(length)
            .read_to_end(&mut body)
            .map_err(|e| format!("read failed: {e}"))?;
        if (body.len() as u64) < length {
            return Err(format!(
                "record {number}: the file ends inside its content ({} of {length} bytes)",
                body.len()
            ));
        }
    }
    Ok(Some(Record {
        number,
        kind,
        uri,
        content_type,
        body,
        too_large,
        bytes: header_bytes as u64 + length,
    }))
}

/// The document a record holds, if any.
pub fn content(rec: &Record) -> Content {
    let media = rec
        .content_type
        .as_deref()
        .map(|c| c.to_ascii_lowercase())
        .unwrap_or_default();
    let is_doc = match rec.kind.as_str() {
        "conversion" => true,
        "response" => media.starts_with("application/http"),
        "resource" => is_html(&media),
        _ => false,
    };
    if !is_doc {
        return Content::Ignored;
    }
    if rec.too_large {
        return Content::Skipped("too-large", format!("record over {} MiB", MAX_RECORD >> 20));
    }
    match rec.kind.as_str() {
        "conversion" => Content::Text(String::from_utf8_lossy(&rec.body).into_owned()),
        "resource" => html_doc(&rec.body, charset_of(&media)),
        _ => http_response(&rec.body),
    }
}

fn is_html(media: &str) -> bool {
    media.starts_with("text/html") || media.starts_with("application/xhtml+xml")
}

/// `charset=...` of a Content-Type value.
fn charset_of(content_type: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k.trim().eq_ignore_ascii_case("charset"))
            .then(|| v.trim().trim_matches(['"', '\'']).to_ascii_lowercase())
    })
}

/// An HTTP response message: status line, headers, payload.
fn http_response(msg: &[u8]) -> Content {
    let Some(split) = find(msg, b"\r\n\r\n")
        .map(|i| (i, i + 4))
        .or_else(|| find(msg, b"\n\n").map(|i| (i, i + 2)))
    else {
        return Content::Skipped("bad-http", "no end of the HTTP header".into());
    };
    let head = String::from_utf8_lossy(&msg[..split.0]);
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok());
    match status {
        Some(s) if (200..300).contains(&s) => {}
        Some(s) => return Content::Skipped("http-status", format!("HTTP status {s}")),
        None => return Content::Skipped("bad-http", "no HTTP status line".into()),
    }
    let (mut media, mut chunked, mut encoding) = (String::new(), false, String::new());
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim().to_ascii_lowercase();
        match k.trim().to_ascii_lowercase().as_str() {
            "content-type" => media = v,
            "transfer-encoding" => chunked = v.contains("chunked"),
            "content-encoding" => encoding = v,
            _ => {}
        }
    }
    if !media.is_empty() && !is_html(&media) {
        let shown = media.split(';').next().unwrap_or_default().to_string();
        return Content::Skipped("not-html", shown);
    }
    let mut payload = msg[split.1..].to_vec();
    if chunked {
        match dechunk(&payload) {
            Some(p) => payload = p,
            None => return Content::Skipped("bad-http", "malformed chunked payload".into()),
        }
    }
    match encoding.as_str() {
        "" | "identity" => {}
        "gzip" | "x-gzip" | "deflate" => {
            let mut out = Vec::new();
            let ok = if encoding == "deflate" {
                flate2::read::ZlibDecoder::new(&payload[..])
                    .take(MAX_RECORD)
                    .read_to_end(&mut out)
                    .is_ok()
            } else {
                flate2::read::MultiGzDecoder::new(&payload[..])
                    .take(MAX_RECORD)
                    .read_to_end(&mut out)
                    .is_ok()
            };
            if !ok {
                return Content::Skipped("bad-http", format!("corrupt {encoding} payload"));
            }
            payload = out;
        }
        other => {
            return Content::Skipped("bad-http", format!("content encoding {other}"));
        }
    }
    html_doc(&payload, charset_of(&media))
}

/// Decodes a page (HTTP charset, else `<meta charset>`, else UTF-8) and extracts its main text.
pub fn html_doc(bytes: &[u8], charset: Option<String>) -> Content {
    let label = charset.or_else(|| meta_charset(bytes));
    let encoding = label
        .as_deref()
        .and_then(|l| encoding_rs::Encoding::for_label(l.as_bytes()))
        .unwrap_or(encoding_rs::UTF_8);
    let (text, _, _) = encoding.decode(bytes);
    match crate::html::main_text(&text) {
        Some(t) => Content::Text(t),
        None => Content::Skipped("no-main-text", "the page has no main text".into()),
    }
}

/// The charset a page declares in its first 2 KiB (`<meta charset=…>` or http-equiv).
fn meta_charset(bytes: &[u8]) -> Option<String> {
    let head = String::from_utf8_lossy(&bytes[..bytes.len().min(2048)]).to_ascii_lowercase();
    let at = head.find("charset=")? + "charset=".len();
    let value: String = head[at..]
        .trim_start_matches(['"', '\''])
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':' | '.'))
        .collect();
    (!value.is_empty()).then_some(value)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The payload of a chunked transfer encoding.
fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = find(data, b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..eol]).ok()?;
        let size_text = size_text.split(';').next()?.trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        if data.len() < size {
            return None;
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size..)?;
        data = data.strip_prefix(b"\r\n").unwrap_or(data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: &str, ctype: &str, body: &[u8]) -> Vec<u8> {
        let mut v = format!(
            "WARC/1.0\r\nWARC-Type: {kind}\r\nWARC-Target-URI: http://example.com/a\r\n\
             Content-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        v.extend_from_slice(body);
        v.extend_from_slice(b"\r\n\r\n");
        v
    }

    #[test]
    fn records_are_read_in_turn_and_classified() {
        let page = "<html><body><article><p>Otters returned to the river after forty years, \
            volunteers who survey its banks every spring said on Monday.</p></article></body></html>";
        let http = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
             Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{page}\r\n0\r\n\r\n",
            page.len()
        );
        let mut file = record("warcinfo", "application/warc-fields", b"software: x\r\n");
        file.extend(record(
            "request",
            "application/http; msgtype=request",
            b"GET / HTTP/1.1\r\n\r\n",
        ));
        file.extend(record(
            "response",
            "application/http; msgtype=response",
            http.as_bytes(),
        ));
        file.extend(record(
            "response",
            "application/http; msgtype=response",
            b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\n\r\n<p>gone</p>",
        ));
        file.extend(record(
            "response",
            "application/http; msgtype=response",
            b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n\r\n\x89PNG",
        ));
        file.extend(record(
            "conversion",
            "text/plain",
            "한국어 문장입니다.\nSecond line".as_bytes(),
        ));
        let mut r = &file[..];
        let mut got = Vec::new();
        let mut n = 0;
        while let Some(rec) = next_record(&mut r, n + 1).unwrap() {
            n += 1;
            got.push(match content(&rec) {
                Content::Text(t) => format!("text:{t}"),
                Content::Ignored => "ignored".into(),
                Content::Skipped(k, d) => format!("{k}:{d}"),
            });
        }
        assert_eq!(got.len(), 6);
        assert_eq!(got[0], "ignored");
        assert_eq!(got[1], "ignored");
        assert!(got[2].starts_with("text:Otters returned"), "{}", got[2]);
        assert_eq!(got[3], "http-status:HTTP status 404");
        assert_eq!(got[4], "not-html:image/png");
        assert_eq!(got[5], "text:한국어 문장입니다.\nSecond line");
    }

    #[test]
    fn malformed_files_say_which_record() {
        let mut r = &b"not a warc\r\n"[..];
        assert!(next_record(&mut r, 1).unwrap_err().contains("record 1"));
        let mut r = &b"WARC/1.0\r\nWARC-Type: response\r\nContent-Length: 100\r\n\r\nshort"[..];
        assert!(next_record(&mut r, 1).unwrap_err().contains("ends inside"));
        let mut r = &b"WARC/1.0\r\nWARC-Type: response\r\n\r\n"[..];
        assert!(next_record(&mut r, 1)
            .unwrap_err()
            .contains("no Content-Length"));
        // A file without line ends is not read whole as one line.
        let zeros = vec![0u8; MAX_HEADER + 10];
        let mut r = &zeros[..];
        let e = next_record(&mut r, 1).unwrap_err();
        assert!(e.contains("record 1: header longer than 1 MiB"), "{e}");
        assert!(r.len() >= 8, "{} bytes left", r.len());
    }

    #[test]
    fn legacy_charsets_are_decoded() {
        let mut page = b"<html><head><meta charset=\"euc-kr\"></head><body><article><p>".to_vec();
        let (korean, _, _) = encoding_rs::EUC_KR.encode(
            "수달이 사십 년 만에 강으로 돌아왔다고 매년 봄 강둑을 조사하는 자원봉사자들이 월요일에 말했다.",
        );
        page.extend_from_slice(&korean);
        page.extend_from_slice(b"</p></article></body></html>");
        match html_doc(&page, None) {
            Content::Text(t) => assert!(t.starts_with("수달이 사십 년"), "{t}"),
            _ => panic!("no text"),
        }
    }
}

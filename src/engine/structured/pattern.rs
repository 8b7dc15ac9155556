//! A JSON Schema `pattern` (an ECMA-262 regex) → the regex of a JSON string's content that matches it. Two
//! differences are bridged so that every text is valid:
//! - ECMA's `\d`, `\w`, `\b` are ASCII and its `\s` and `.` have their own sets, where Rust's are Unicode:
//!   each is spelled out as ECMA means it;
//! - the pattern runs on the written JSON text here, not the decoded string, so every class is narrowed to
//!   the characters JSON writes as themselves (not `"`, `\` or a control character), and a literal one of
//!   those is refused.
//!
//! The whole string matches the pattern: a leading `^` and trailing `$` are dropped, and a pattern without
//! them is taken as if anchored (a narrower language than JSON Schema's "contains a match", every text of it
//! still valid); anchors elsewhere are refused.

use regex_syntax::ast::{self, Ast, ClassPerlKind, ClassSetItem};
use regex_syntax::hir::{self, Class, Hir, HirKind};

/// The characters a JSON string holds as themselves.
const SAFE: &[(char, char)] = &[(' ', '!'), ('#', '['), (']', '\u{10FFFF}')];

/// The regex of the string contents (between the quotes) that match `pattern`, or what is wrong with it.
pub fn string_content(pattern: &str) -> Result<String, String> {
    let p = pattern.strip_prefix('^').unwrap_or(pattern);
    let p = p.strip_suffix('$').filter(|q| !q.ends_with('\\')).unwrap_or(p);
    let ecma = as_ecma(p)?;
    let hir = regex_syntax::ParserBuilder::new().build().parse(&ecma).map_err(|e| e.to_string())?;
    Ok(json_safe(hir)?.to_string())
}

/// `p` with ECMA's meaning of `\d`, `\w`, `\s`, `.` and `\b` spelled out in Rust's syntax.
fn as_ecma(p: &str) -> Result<String, String> {
    let ast = ast::parse::Parser::new().parse(p).map_err(|e| e.to_string())?;
    let mut edits = ast::visit(&ast, Ecma(Vec::new(), p))?;
    edits.sort_by_key(|(start, ..)| std::cmp::Reverse(*start));
    let mut out = p.to_string();
    for (start, end, with) in edits {
        out.replace_range(start..end, with);
    }
    Ok(out)
}

/// Collects the spans to rewrite, with what to write there (nested classes work inside brackets too), in
/// the pattern; refuses the syntax that means something else in ECMA-262 than in Rust.
struct Ecma<'p>(Vec<(usize, usize, &'static str)>, &'p str);

impl Ecma<'_> {
    fn perl(&mut self, c: &ast::ClassPerl) {
        let with = match (c.kind.clone(), c.negated) {
            (ClassPerlKind::Digit, false) => "[0-9]",
            (ClassPerlKind::Digit, true) => "[^0-9]",
            (ClassPerlKind::Word, false) => "[0-9A-Za-z_]",
            (ClassPerlKind::Word, true) => "[^0-9A-Za-z_]",
            (ClassPerlKind::Space, false) => ECMA_SPACE,
            (ClassPerlKind::Space, true) => ECMA_NOT_SPACE,
        };
        self.0.push((c.span.start.offset, c.span.end.offset, with));
    }
}

const ECMA_SPACE: &str =
    r"[\t\n\x0B\x0C\r \xA0\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000}\x{FEFF}]";
const ECMA_NOT_SPACE: &str =
    r"[^\t\n\x0B\x0C\r \xA0\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000}\x{FEFF}]";

impl ast::Visitor for Ecma<'_> {
    type Output = Vec<(usize, usize, &'static str)>;
    type Err = String;

    fn finish(self) -> Result<Self::Output, String> {
        Ok(self.0)
    }

    fn visit_pre(&mut self, a: &Ast) -> Result<(), String> {
        match a {
            Ast::ClassPerl(c) => self.perl(c),
            Ast::Dot(span) => self.0.push((span.start.offset, span.end.offset, r"[^\n\r\x{2028}\x{2029}]")),
            Ast::Flags(_) => return Err("inline flags are not ECMA-262".into()),
            Ast::Group(g) if g.flags().is_some_and(|f| !f.items.is_empty()) => {
                return Err("inline flags are not ECMA-262".into())
            }
            // `[]a]` is `]` or `a` to Rust, an empty class then `a]` to ECMA.
            Ast::ClassBracketed(c) => {
                let inside = &self.1[c.span.start.offset + 1..];
                if inside.strip_prefix('^').unwrap_or(inside).starts_with(']') {
                    return Err(format!(
                        "a `]` first in the class at byte {} means another thing in ECMA-262",
                        c.span.start.offset
                    ));
                }
            }
            Ast::Assertion(x) => {
                let with = match x.kind {
                    ast::AssertionKind::WordBoundary => r"(?-u:\b)",
                    ast::AssertionKind::NotWordBoundary => r"(?-u:\B)",
                    _ => {
                        return Err(format!("anchor at byte {} is not supported inside a pattern", x.span.start.offset))
                    }
                };
                self.0.push((x.span.start.offset, x.span.end.offset, with));
            }
            _ => {}
        }
        Ok(())
    }

    fn visit_class_set_item_pre(&mut self, item: &ClassSetItem) -> Result<(), String> {
        match item {
            ClassSetItem::Perl(c) => self.perl(c),
            ClassSetItem::Ascii(_) => return Err("`[:name:]` classes are not ECMA-262".into()),
            ClassSetItem::Bracketed(_) => return Err("nested classes are not ECMA-262".into()),
            _ => {}
        }
        Ok(())
    }

    fn visit_class_set_binary_op_pre(&mut self, _: &ast::ClassSetBinaryOp) -> Result<(), String> {
        Err("class operations (`&&`, `--`, `~~`) are not ECMA-262".into())
    }
}

/// `h` with every class narrowed to [`SAFE`]; a literal outside it is refused.
fn json_safe(h: Hir) -> Result<Hir, String> {
    Ok(match h.into_kind() {
        HirKind::Empty => Hir::empty(),
        HirKind::Literal(hir::Literal(bytes)) => {
            if let Some(&b) = bytes.iter().find(|&&b| b == b'"' || b == b'\\' || b < 0x20) {
                return Err(format!("the literal character {:?} is one JSON writes escaped", b as char));
            }
            Hir::literal(bytes)
        }
        HirKind::Class(Class::Unicode(mut c)) => {
            c.intersect(&hir::ClassUnicode::new(SAFE.iter().map(|&(a, b)| hir::ClassUnicodeRange::new(a, b))));
            Hir::class(Class::Unicode(c))
        }
        HirKind::Class(Class::Bytes(mut c)) => {
            let safe = [(b' ', b'!'), (b'#', b'['), (b']', 0x7F)];
            c.intersect(&hir::ClassBytes::new(safe.iter().map(|&(a, b)| hir::ClassBytesRange::new(a, b))));
            Hir::class(Class::Bytes(c))
        }
        HirKind::Look(l) => Hir::look(l),
        HirKind::Repetition(r) => Hir::repetition(hir::Repetition { sub: Box::new(json_safe(*r.sub)?), ..r }),
        HirKind::Capture(c) => Hir::capture(hir::Capture { sub: Box::new(json_safe(*c.sub)?), ..c }),
        HirKind::Concat(v) => Hir::concat(v.into_iter().map(json_safe).collect::<Result<_, _>>()?),
        HirKind::Alternation(v) => Hir::alternation(v.into_iter().map(json_safe).collect::<Result<_, _>>()?),
    })
}

#[cfg(test)]
mod tests {
    use super::super::Whole;
    use super::*;

    fn content(pattern: &str) -> Whole {
        Whole::new(&string_content(pattern).unwrap_or_else(|e| panic!("{pattern}: {e}")))
    }

    #[test]
    fn classes_mean_what_ecma_means() {
        let digits = content(r"^\d+$");
        assert!(digits.is_match("0123") && !digits.is_match("١٢"), "\\d is ASCII");
        let word = content(r"\w+");
        assert!(word.is_match("a_Z9") && !word.is_match("é"), "\\w is ASCII");
        let bracket = content(r"[\d\s]+");
        assert!(bracket.is_match("1 2\u{FEFF}") && !bracket.is_match("1\u{85}"), "\\s is ECMA's, in brackets too");
        let dot = content("a.c");
        assert!(dot.is_match("abc") && dot.is_match("aéc") && !dot.is_match("a\u{2028}c"));
    }

    /// Nothing a pattern allows can break the JSON string: no quote, backslash or control character.
    #[test]
    fn classes_keep_to_what_json_writes_as_itself() {
        let any = content(r"[^@]+@.+");
        assert!(any.is_match("ada@example.com"));
        for bad in ["a\"b@c", "a\\b@c", "a@b\u{1}", "a\nb@c"] {
            assert!(!any.is_match(bad), "{bad:?}");
        }
        for (pattern, why) in [(r#"a"b"#, "JSON writes escaped"), (r"a\\b", "JSON writes escaped"), ("a^b", "anchor")] {
            let e = string_content(pattern).unwrap_err();
            assert!(e.contains(why), "{pattern}: {e}");
        }
        assert!(string_content("(a").is_err());
        for (pattern, why) in [
            ("[[:alpha:]]", "`[:name:]`"),
            ("[a-z&&[^aeiou]]", "class operations"),
            ("[a[bc]]", "nested classes"),
            ("[a-c--b]", "class operations"),
            ("[]a]", "a `]` first"),
            ("[^]a]", "a `]` first"),
            ("(?i)a", "inline flags"),
            ("(?i:a)", "inline flags"),
        ] {
            let e = string_content(pattern).unwrap_err();
            assert!(e.contains(why), "{pattern}: {e}");
        }
        assert!(content(r"[\]a]+").is_match("]a"), "an escaped `]` is fine");
    }
}

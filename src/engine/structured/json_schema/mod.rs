//! JSON Schema → a regex of the JSON texts the schema accepts (as Outlines builds its, and vLLM and TGI with
//! it): compact JSON with at most one space around `:` and `,`, object members in the schema's order (the
//! required ones always, the optional ones when the model writes them), and no members the schema does not
//! list; integers within `minimum` / `maximum` ([`super::int_range`]). Every text of the regex is valid
//! against the schema; a keyword that would make that untrue if it were left out (`minimum` on a `number`,
//! `multipleOf`, `uniqueItems`, `not`, …) is refused by name and path, never ignored.
//!
//! Nesting that the schema leaves open (`{}`, `"type": "object"` without properties, `json_object`) is
//! bounded at [`ANY_DEPTH`] levels, since a regex has no recursion; so is a recursive `$ref`, which is
//! refused. A `$ref` is written out where it is used, so a schema of a few KB can name a regex of gigabytes
//! (each definition using the one before twice): the regex is refused past [`MAX_REGEX_BYTES`] as it is
//! built, never after.

use std::fmt::Write as _;

use regex_syntax::escape;
use serde_json::{Map, Value};

/// How deeply a value the schema leaves open may nest (objects and arrays inside it).
pub const ANY_DEPTH: usize = 3;

/// The deepest a schema's subschemas may nest, `$ref`s followed (each a level): the builder recurses once a
/// level, and a chain of a few thousand overflowed the thread's stack (the process aborts).
pub const MAX_DEPTH: usize = 128;

/// Pairs of values the `oneOf` check may compare (each subschema's listed values, or 1, times each other's):
/// past it a `oneOf` of thousands of consts took a minute to check. An `enum` says the same at no cost.
const ONE_OF_WORK: usize = 2_000_000;

/// Where in the schema `at` is, for messages: its JSON pointer, or "the schema" at the root.
fn place(at: &str) -> &str {
    if at.is_empty() {
        "the schema"
    } else {
        at
    }
}

/// The longest regex a schema may become. An open value (`{}`) is ~22 KB of it; regexes this long already
/// come close to the compiled automaton's own limit.
pub const MAX_REGEX_BYTES: usize = 1 << 20;

/// Between tokens of the JSON text: nothing or one space (Outlines' default).
const WS: &str = "[ ]?";
/// A JSON string: any character but `"`, `\` and control characters, or an escape.
const STRING: &str =
    r#""(?:[^"\\\x00-\x1F]|\\["\\/bfnrt]|\\u(?:[0-9a-cA-CefEF][0-9a-fA-F]{3}|[dD][0-7][0-9a-fA-F]{2}))*""#;
/// A character of a JSON string, escaped or not. A `\u` escape is never half a surrogate pair (serde_json,
/// among others, refuses a lone one); characters past U+FFFF are written as themselves.
const STRING_CHAR: &str =
    r#"(?:[^"\\\x00-\x1F]|\\["\\/bfnrt]|\\u(?:[0-9a-cA-CefEF][0-9a-fA-F]{3}|[dD][0-7][0-9a-fA-F]{2}))"#;
const INTEGER: &str = "-?(?:0|[1-9][0-9]*)";
const NUMBER: &str = "-?(?:0|[1-9][0-9]*)(?:\\.[0-9]+)?(?:[eE][+-]?[0-9]+)?";
const BOOLEAN: &str = "(?:true|false)";
const NULL: &str = "null";

/// Keywords that only annotate: they do not narrow what is valid.
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "$schema",
    "$id",
    "$comment",
    "examples",
    "default",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$defs",
    "definitions",
];

/// `regex`, unless it is past [`MAX_REGEX_BYTES`] (the part of the schema at `at` made it so).
fn fit(regex: String, at: &str) -> Result<String, String> {
    fit_len(regex.len(), at).map(|()| regex)
}

/// Refuses parts of `len` bytes in all past [`MAX_REGEX_BYTES`], before they are joined.
fn fit_len(len: usize, at: &str) -> Result<(), String> {
    if len <= MAX_REGEX_BYTES {
        return Ok(());
    }
    Err(format!(
        "{}: too large: its regex passes {} MiB (every `$ref` and open value is written out where it is used)",
        place(at),
        MAX_REGEX_BYTES >> 20
    ))
}

/// The regex of `schema` (JSON text), or what is wrong with it (with the JSON pointer of the place).
pub fn regex_of_schema(schema: &str) -> Result<String, String> {
    let root: Value = serde_json::from_str(schema).map_err(|e| format!("not JSON: {e}"))?;
    Builder { root: &root, refs: Vec::new(), depth: 0, under_id: 0, built: Default::default() }.value(&root, "")
}

/// The regex of any JSON object (vLLM's `json_object`), nesting at most [`ANY_DEPTH`] levels.
pub fn regex_of_any_object() -> String {
    object_of(&any(ANY_DEPTH - 1))
}

/// Any JSON value, nesting at most `depth` more levels.
fn any(depth: usize) -> String {
    let scalar = format!("{STRING}|{NUMBER}|{BOOLEAN}|{NULL}");
    if depth == 0 {
        return format!("(?:{scalar})");
    }
    let inner = any(depth - 1);
    format!("(?:{scalar}|{}|{})", array_of(&inner, 0, None), object_of(&inner))
}

/// An object whose members' values are `value`.
fn object_of(value: &str) -> String {
    let member = format!("{STRING}{WS}:{WS}{value}");
    format!(r"\{{{WS}(?:{member}(?:{WS},{WS}{member})*)?{WS}\}}")
}

/// An array of `min` to `max` items of `item`.
fn array_of(item: &str, min: u64, max: Option<u64>) -> String {
    let more = |lo: u64| match max {
        Some(hi) => format!("(?:{WS},{WS}{item}){{{lo},{}}}", hi.saturating_sub(1)),
        None => format!("(?:{WS},{WS}{item}){{{lo},}}"),
    };
    let items = match (min, max) {
        (_, Some(0)) => String::new(),
        (0, _) => format!("(?:{item}{})?", more(0)),
        (n, _) => format!("{item}{}", more(n - 1)),
    };
    format!(r"\[{WS}{items}{WS}\]")
}

struct Builder<'a> {
    root: &'a Value,
    /// The `$ref`s being expanded, to refuse recursion.
    refs: Vec<String>,
    /// Subschemas being built, one inside the other (at most [`MAX_DEPTH`]).
    depth: usize,
    /// Of those, the ones with an `$id` of their own (the root's aside): a `$ref` under one resolves against
    /// that `$id`, which this builder does not follow.
    under_id: usize,
    /// The regex of every `$ref` built so far: the same wherever it is used, and built once (a chain of
    /// definitions each using the one before twice took 2^depth builds, however small its regex).
    built: std::collections::HashMap<String, String>,
}

impl<'a> Builder<'a> {
    /// The regex of the subschema at `at`, within [`MAX_REGEX_BYTES`] and [`MAX_DEPTH`].
    fn value(&mut self, schema: &'a Value, at: &str) -> Result<String, String> {
        if self.depth >= MAX_DEPTH {
            return Err(format!("{}: nested more than {MAX_DEPTH} subschemas deep (`$ref`s counted)", place(at)));
        }
        let own_id = !at.is_empty() && schema.get("$id").is_some();
        self.depth += 1;
        self.under_id += usize::from(own_id);
        let regex = self.value_unbounded(schema, at).and_then(|r| fit(r, at));
        self.depth -= 1;
        self.under_id -= usize::from(own_id);
        regex
    }

    /// [`Self::value`] before its size is checked (the parts it joins are checked as they come).
    fn value_unbounded(&mut self, schema: &'a Value, at: &str) -> Result<String, String> {
        let s = match schema {
            Value::Bool(true) => return Ok(any(ANY_DEPTH)),
            Value::Bool(false) => return Err(format!("{}: `false` accepts nothing", place(at))),
            Value::Object(s) => s,
            _ => return Err(format!("{}: a schema is an object or a boolean", place(at))),
        };
        if let Some(r) = s.get("$ref") {
            return self.reference(s, r, at);
        }
        let types: Option<Vec<&str>> = match s.get("type") {
            None => None,
            Some(Value::String(t)) => Some(vec![t.as_str()]),
            Some(Value::Array(ts)) if !ts.is_empty() => Some(
                ts.iter()
                    .map(|t| t.as_str().ok_or_else(|| format!("{at}/type: names of types")))
                    .collect::<Result<_, _>>()?,
            ),
            Some(_) => return Err(format!("{at}/type: a type name or a non-empty array of them")),
        };
        for key in ["const", "enum"] {
            let Some(v) = s.get(key) else { continue };
            check_keywords(s, &[key], at)?;
            let values = match (key, v) {
                ("const", v) => std::slice::from_ref(v),
                (_, Value::Array(v)) if !v.is_empty() => v.as_slice(),
                _ => return Err(format!("{at}/enum: a non-empty array")),
            };
            // With `type` beside it, only the values of that type.
            let typed = |v: &&Value| types.as_ref().is_none_or(|ts| ts.iter().any(|t| has_type(v, t)));
            let alts: Vec<String> = values.iter().filter(typed).map(|v| escape(&v.to_string())).collect();
            if alts.is_empty() {
                return Err(format!("{at}/{key}: no value of the given type"));
            }
            return Ok(format!("(?:{})", alts.join("|")));
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            let Some(list) = s.get(key) else { continue };
            let Some(list) = list.as_array().filter(|l| !l.is_empty()) else {
                return Err(format!("{at}/{key}: a non-empty array"));
            };
            if let Some(k) = s.keys().find(|k| *k != key && !ANNOTATIONS.contains(&k.as_str())) {
                return Err(format!("{}: `{k}` beside `{key}` is not supported", place(at)));
            }
            if key == "allOf" && list.len() > 1 {
                return Err(format!("{at}/allOf: only a single subschema is supported"));
            }
            let (mut alts, mut len) = (Vec::new(), 0);
            for (i, sub) in list.iter().enumerate() {
                let alt = self.value(sub, &format!("{at}/{key}/{i}"))?;
                len += alt.len();
                fit_len(len, at)?;
                alts.push(alt);
            }
            if key == "oneOf" {
                // Valid against exactly one: as anyOf only where no value can be valid against two.
                let sizes: Vec<usize> =
                    list.iter().map(|sub| self.values_of(sub).map_or(1, |v| v.len().max(1))).collect();
                let total: usize = sizes.iter().sum();
                let work = sizes.iter().map(|n| n.saturating_mul(total - n)).fold(0usize, usize::saturating_add) / 2;
                if work > ONE_OF_WORK {
                    return Err(format!(
                        "{at}/oneOf: too many subschemas and values to check that no value is valid against two \
                         ({work} pairs; give one `enum`, or use anyOf)"
                    ));
                }
                for (i, a) in list.iter().enumerate() {
                    for (j, b) in list.iter().enumerate().skip(i + 1) {
                        if !self.told_apart(a, b) {
                            return Err(format!(
                                "{at}/oneOf: subschemas {i} and {j} may both accept a value (oneOf is supported \
                                 when its subschemas differ in type, in const / enum values, or in the const / \
                                 enum values of a property both require)"
                            ));
                        }
                    }
                }
            }
            return Ok(format!("(?:{})", alts.join("|")));
        }
        let types = match types {
            Some(ts) => ts,
            None if s.contains_key("properties") => vec!["object"],
            None if s.contains_key("items") => vec!["array"],
            None => {
                check_keywords(s, &[], at)?;
                return Ok(any(ANY_DEPTH));
            }
        };
        // The keywords of every type listed (each applies to its own type only).
        let mut allowed = Vec::new();
        for t in &types {
            allowed.extend_from_slice(match *t {
                "string" => &["minLength", "maxLength", "pattern", "format"][..],
                "integer" => &["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"],
                "array" => &["items", "minItems", "maxItems"],
                "object" => &["properties", "required", "additionalProperties"],
                "number" | "boolean" | "null" => &[],
                other => return Err(format!("{at}/type: unknown type `{other}`")),
            });
        }
        // `minimum` and the like beside `number` would be left out of its texts.
        if types.contains(&"number") {
            let bounds = ["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"];
            allowed.retain(|k| !bounds.contains(k));
        }
        check_keywords(s, &allowed, at)?;
        let (mut alts, mut len) = (Vec::new(), 0);
        for t in types {
            let alt = match t {
                "string" => self.string(s, at)?,
                "integer" => self.integer(s, at)?,
                "number" => NUMBER.to_string(),
                "boolean" => BOOLEAN.to_string(),
                "null" => NULL.to_string(),
                "array" => self.array(s, at)?,
                "object" => self.object(s, at)?,
                other => return Err(format!("{at}/type: unknown type `{other}`")),
            };
            len += alt.len();
            fit_len(len, at)?;
            alts.push(alt);
        }
        Ok(if alts.len() == 1 { alts.pop().expect("one") } else { format!("(?:{})", alts.join("|")) })
    }

    /// `s` with its `$ref`s followed (a few hops at most).
    fn resolved(&self, mut s: &'a Value) -> &'a Value {
        for _ in 0..8 {
            match s.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix('#')) {
                Some(p) => s = self.root.pointer(p).unwrap_or(s),
                None => break,
            }
        }
        s
    }

    /// The JSON types a value valid against `s` can have (`integer` counted as `number`); `None`: any.
    fn types_of(&self, s: &'a Value) -> Option<Vec<&'static str>> {
        let s = self.resolved(s);
        if let Some(values) = self.values_of(s) {
            return Some(values.iter().map(type_of).collect());
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            if let Some(list) = s.get(key).and_then(Value::as_array) {
                let mut all = Vec::new();
                for sub in list {
                    all.extend(self.types_of(sub)?);
                }
                return Some(all);
            }
        }
        let name = |t: &str| match t {
            "integer" | "number" => Some("number"),
            "string" => Some("string"),
            "boolean" => Some("boolean"),
            "null" => Some("null"),
            "array" => Some("array"),
            "object" => Some("object"),
            _ => None,
        };
        // Without `type`, `properties` and `items` accept every value of another type: any type.
        match s.get("type") {
            Some(Value::String(t)) => Some(vec![name(t)?]),
            Some(Value::Array(ts)) => ts.iter().map(|t| t.as_str().and_then(name)).collect(),
            _ => None,
        }
    }

    /// The values `s` allows when it lists them (`const`, `enum`).
    fn values_of(&self, s: &'a Value) -> Option<&'a [Value]> {
        let s = self.resolved(s);
        match (s.get("const"), s.get("enum")) {
            (Some(c), _) => Some(std::slice::from_ref(c)),
            (None, Some(Value::Array(e))) => Some(e.as_slice()),
            _ => None,
        }
    }

    /// Whether no value can be valid against both `a` and `b`: their types differ, or their listed values
    /// do, or a property both require lists values in each and those differ.
    fn told_apart(&self, a: &'a Value, b: &'a Value) -> bool {
        let (a, b) = (self.resolved(a), self.resolved(b));
        let apart = |x: &[Value], y: &[Value]| x.iter().all(|v| !y.iter().any(|w| same_value(v, w)));
        if let (Some(x), Some(y)) = (self.types_of(a), self.types_of(b)) {
            if x.iter().all(|t| !y.contains(t)) {
                return true;
            }
        }
        if let (Some(x), Some(y)) = (self.values_of(a), self.values_of(b)) {
            return apart(x, y);
        }
        let required = |s: &'a Value| -> Vec<&'a str> {
            s.get("required")
                .and_then(Value::as_array)
                .map_or(Vec::new(), |r| r.iter().filter_map(Value::as_str).collect())
        };
        // A tag: only between schemas that accept objects alone.
        let objects = |s: &'a Value| self.types_of(s).is_some_and(|ts| ts.iter().all(|t| *t == "object"));
        if !objects(a) || !objects(b) {
            return false;
        }
        let (ra, rb) = (required(a), required(b));
        ra.iter().filter(|p| rb.contains(p)).any(|p| {
            let prop = |s: &'a Value| s.get("properties").and_then(|ps| ps.get(*p));
            match (prop(a).and_then(|s| self.values_of(s)), prop(b).and_then(|s| self.values_of(s))) {
                (Some(x), Some(y)) => apart(x, y),
                _ => false,
            }
        })
    }

    /// `{"$ref": "#/$defs/name"}` (or any JSON pointer into this document).
    fn reference(&mut self, s: &'a Map<String, Value>, r: &Value, at: &str) -> Result<String, String> {
        let siblings: Vec<&String> = s.keys().filter(|k| *k != "$ref" && !ANNOTATIONS.contains(&k.as_str())).collect();
        if let Some(k) = siblings.first() {
            return Err(format!("{}: `{k}` beside `$ref` is not supported", place(at)));
        }
        let r = r.as_str().ok_or_else(|| format!("{at}/$ref: a string"))?;
        // Under a subschema with an `$id` of its own, `#…` means that subschema, not the root: refused rather
        // than resolved against the wrong document.
        if self.under_id > 0 {
            return Err(format!("{at}/$ref: under a subschema with an `$id` of its own, which is not supported"));
        }
        let pointer =
            r.strip_prefix('#').ok_or_else(|| format!("{at}/$ref: `{r}` is not in this document (only `#…` is)"))?;
        let target = self.root.pointer(pointer).ok_or_else(|| format!("{at}/$ref: `{r}` points at nothing"))?;
        if self.refs.iter().any(|seen| seen == r) {
            return Err(format!("{at}/$ref: `{r}` is recursive, which a regex cannot follow"));
        }
        if let Some(regex) = self.built.get(r) {
            return Ok(regex.clone());
        }
        self.refs.push(r.to_string());
        let out = self.value(target, &format!("{at}/$ref={r}"));
        self.refs.pop();
        if let Ok(regex) = &out {
            self.built.insert(r.to_string(), regex.clone());
        }
        out
    }

    fn string(&mut self, s: &Map<String, Value>, at: &str) -> Result<String, String> {
        if let Some(p) = s.get("pattern") {
            if let Some(k) = ["minLength", "maxLength", "format"].iter().find(|k| s.contains_key(**k)) {
                return Err(format!("{}: `pattern` with `{k}` is not supported", place(at)));
            }
            let p = p.as_str().ok_or_else(|| format!("{at}/pattern: a string"))?;
            let content = super::pattern::string_content(p).map_err(|e| format!("{at}/pattern: {e}"))?;
            return Ok(format!("\"(?:{content})\""));
        }
        if let Some(f) = s.get("format") {
            // A format's texts are of its own lengths: a length beside it would be ignored.
            if let Some(k) = ["minLength", "maxLength"].iter().find(|k| s.contains_key(**k)) {
                return Err(format!("{}: `format` with `{k}` is not supported", place(at)));
            }
            let f = f.as_str().ok_or_else(|| format!("{at}/format: a string"))?;
            let body = match f {
                "date" => DATE.to_string(),
                "time" => TIME.to_string(),
                "date-time" => format!("{DATE}T{TIME}"),
                "uuid" => "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}".into(),
                other => {
                    return Err(format!("{at}/format: `{other}` is not supported (date, time, date-time, uuid are)"))
                }
            };
            return Ok(format!("\"{body}\""));
        }
        let min = count(s, "minLength", at)?.unwrap_or(0);
        Ok(match count(s, "maxLength", at)? {
            Some(max) if max < min => return Err(format!("{}: maxLength {max} is below minLength {min}", place(at))),
            Some(max) => format!("\"{STRING_CHAR}{{{min},{max}}}\""),
            None if min == 0 => STRING.to_string(),
            None => format!("\"{STRING_CHAR}{{{min},}}\""),
        })
    }

    /// An integer, within `minimum` / `maximum` and their exclusive forms (a number, or draft 4's boolean
    /// beside the bound it makes exclusive).
    fn integer(&mut self, s: &Map<String, Value>, at: &str) -> Result<String, String> {
        // Draft 4's boolean `exclusiveMinimum` / `exclusiveMaximum` make the bound beside them strict.
        let flag = |key: &str| s.get(key).and_then(Value::as_bool).unwrap_or(false);
        let bound = |key: &str, strict: bool, up: bool| -> Result<Option<i64>, String> {
            match s.get(key) {
                None => Ok(None),
                Some(Value::Bool(_)) if key.starts_with("exclusive") => Ok(None),
                Some(Value::Number(n)) => {
                    int_bound(n, strict, up).map(Some).ok_or_else(|| format!("{at}/{key}: outside 64-bit integers"))
                }
                Some(_) => Err(format!("{at}/{key}: a number")),
            }
        };
        let lows = [bound("minimum", flag("exclusiveMinimum"), true)?, bound("exclusiveMinimum", true, true)?];
        let highs = [bound("maximum", flag("exclusiveMaximum"), false)?, bound("exclusiveMaximum", true, false)?];
        let lo = lows.into_iter().flatten().max();
        let hi = highs.into_iter().flatten().min();
        if lo.is_none() && hi.is_none() {
            return Ok(INTEGER.to_string());
        }
        super::int_range::regex(lo, hi)
            .ok_or_else(|| format!("{}: no integer is within its minimum and maximum", place(at)))
    }

    fn array(&mut self, s: &'a Map<String, Value>, at: &str) -> Result<String, String> {
        let min = count(s, "minItems", at)?.unwrap_or(0);
        let max = count(s, "maxItems", at)?;
        if max.is_some_and(|m| m < min) {
            return Err(format!("{}: maxItems is below minItems", place(at)));
        }
        let item = match s.get("items") {
            // No item is ever written: its regex would be built for nothing.
            Some(_) if max == Some(0) => String::new(),
            Some(items) => self.value(items, &format!("{at}/items"))?,
            None => any(ANY_DEPTH - 1),
        };
        Ok(array_of(&item, min, max))
    }

    fn object(&mut self, s: &'a Map<String, Value>, at: &str) -> Result<String, String> {
        let required: Vec<&str> = match s.get("required") {
            None => Vec::new(),
            Some(Value::Array(r)) => {
                r.iter().map(|n| n.as_str().ok_or_else(|| format!("{at}/required: names"))).collect::<Result<_, _>>()?
            }
            Some(_) => return Err(format!("{at}/required: an array of names")),
        };
        let Some(props) = s.get("properties") else {
            if let Some(name) = required.first() {
                return Err(format!("{at}/required: `{name}` is not among the properties"));
            }
            // Members of any name: their values as `additionalProperties` says (absent or true: anything).
            return match s.get("additionalProperties") {
                None | Some(Value::Bool(true)) => Ok(object_of(&any(ANY_DEPTH - 1))),
                Some(Value::Bool(false)) => Ok(format!(r"\{{{WS}\}}")),
                Some(extra) => Ok(object_of(&self.value(extra, &format!("{at}/additionalProperties"))?)),
            };
        };
        let props = props.as_object().ok_or_else(|| format!("{at}/properties: an object"))?;
        if let Some(name) = required.iter().find(|n| !props.contains_key(**n)) {
            return Err(format!("{at}/required: `{name}` is not among the properties"));
        }
        // The listed members, in order; texts with fewer members (no others) are still valid.
        let (mut members, mut len) = (Vec::new(), 0);
        for (name, sub) in props {
            let value = self.value(sub, &format!("{at}/properties/{name}"))?;
            let member = format!("{}{WS}:{WS}{value}", escape(&Value::String(name.clone()).to_string()));
            len += member.len();
            fit_len(len, at)?;
            members.push((member, required.contains(&name.as_str())));
        }
        // Quadratic in the optional members (each may be the first written): measured before it is built.
        fit_len(members_len(&members), at)?;
        Ok(format!(r"\{{{WS}{}{WS}\}}", members_after(&members)))
    }
}

/// The members, each optional one present or not, with a comma before every member but the first written.
/// Up to the first required member, each optional one may be the first written: `(?:m0 rest|(?:m1 rest|…))`,
/// each `rest` a tail of the same written-after-a-member text. Built in one pass, no deeper than a loop (a
/// recursion a member deep overflowed the stack at 10,000 members); its length is [`members_len`].
fn members_after(members: &[(String, bool)]) -> String {
    // `after[i..]`: the members from i on, each after a comma, as they follow one already written.
    let mut after = String::new();
    let mut starts = Vec::with_capacity(members.len() + 1);
    for (member, required) in members {
        starts.push(after.len());
        let _ = if *required { write!(after, "{WS},{WS}{member}") } else { write!(after, "(?:{WS},{WS}{member})?") };
    }
    starts.push(after.len());
    let mut out = String::new();
    let mut open = 0;
    for (i, (member, required)) in members.iter().enumerate() {
        let rest = &after[starts[i + 1]..];
        if *required {
            out.push_str(member);
            out.push_str(rest);
            break;
        }
        out.push_str("(?:");
        out.push_str(member);
        out.push_str(rest);
        out.push('|');
        open += 1;
    }
    out.push_str(&")".repeat(open));
    out
}

/// The length of [`members_after`]`(members)`, worked out from the back without building it.
fn members_len(members: &[(String, bool)]) -> usize {
    // After member i: the tail once a member is written (`written`), and the rest with none written yet.
    let (mut written, mut none) = (0usize, 0usize);
    for (member, required) in members.iter().rev() {
        let this = 2 * WS.len() + 1 + member.len(); // "{WS},{WS}{member}"
        let with = member.len().saturating_add(written);
        (written, none) = if *required {
            (this.saturating_add(written), with)
        } else {
            // "(?:{this})?" and "(?:{with}|{none})"
            (this.saturating_add(5).saturating_add(written), with.saturating_add(none).saturating_add(5))
        };
    }
    none
}

/// The first integer at or past `n` upwards (`up`) or downwards, past it when `strict`; `None` outside i64.
fn int_bound(n: &serde_json::Number, strict: bool, up: bool) -> Option<i64> {
    let step = if up { 1 } else { -1 };
    if let Some(i) = n.as_i64() {
        return if strict { i.checked_add(step) } else { Some(i) };
    }
    let f = n.as_f64()?;
    let g = if up { f.floor() + 1.0 } else { f.ceil() - 1.0 };
    let v = if strict || f.fract() != 0.0 { g } else { f };
    // Whole f64s within i64 convert exactly; 2^63 itself does not fit, and neither end is taken: a bound past
    // i64 (−2^63 − 2, or one below −2^63 by a strict comparison) rounds to exactly −2^63 in f64.
    let edge = i64::MIN as f64; // −2^63, exactly
    (v > edge && v < -edge).then_some(v as i64)
}

/// Whether `v` and `w` are one value to JSON Schema: numbers compare by value (1 and 1.0 are one), arrays
/// and objects member by member.
fn same_value(v: &Value, w: &Value) -> bool {
    match (v, w) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
            (Some(a), Some(b), ..) => a == b,
            (_, _, Some(a), Some(b)) => a == b,
            _ => x.as_f64() == y.as_f64(),
        },
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_value(a, b)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, a)| y.get(k).is_some_and(|b| same_value(a, b)))
        }
        _ => v == w,
    }
}

/// The JSON type of `v` (integers counted as numbers).
fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Whether `v` is of JSON Schema type `t`.
fn has_type(v: &Value, t: &str) -> bool {
    match t {
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => false,
    }
}

/// Refuses any keyword beyond the annotations and `allowed`: left out, it could let an invalid text through.
fn check_keywords(s: &Map<String, Value>, allowed: &[&str], at: &str) -> Result<(), String> {
    let known = |k: &str| k == "type" || ANNOTATIONS.contains(&k) || allowed.contains(&k) || k.starts_with("x-");
    match s.keys().find(|k| !known(k)) {
        Some(k) => Err(format!("{}: keyword `{k}` is not supported here", place(at))),
        None => Ok(()),
    }
}

/// A non-negative integer keyword.
fn count(s: &Map<String, Value>, key: &str, at: &str) -> Result<Option<u64>, String> {
    let Some(v) = s.get(key) else { return Ok(None) };
    let n = v.as_u64().ok_or_else(|| format!("{at}/{key}: a non-negative integer"))?;
    // The regex's repetition counts are 32-bit: past them the regex itself fails, quoting its text.
    if n > u32::MAX as u64 {
        return Err(format!("{at}/{key}: {n} is past the largest count supported, {}", u32::MAX));
    }
    Ok(Some(n))
}

/// RFC 3339's full-date, as a calendar has it: 31 days in January, March, May, July, August, October and
/// December, 30 in the other months but February, which has 28, or 29 in leap years (divisible by 4, and
/// centuries only when divisible by 400).
const DATE: &str = concat!(
    "(?:[0-9]{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)",
    "|02-(?:0[1-9]|1[0-9]|2[0-8]))",
    "|(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00)-02-29)"
);
/// RFC 3339's full-time: the offset is required.
const TIME: &str = "(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]+)?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])";

#[cfg(test)]
mod tests;

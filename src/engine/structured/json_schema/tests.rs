//! The JSON Schema → regex builder against instances it must accept and refuse, and the schemas it refuses.

use super::super::Whole;
use super::*;

fn whole(regex: &str) -> Whole {
    Whole::new(regex)
}

/// Each schema's regex matches the texts given as valid and none of the invalid ones.
#[test]
fn schemas_accept_their_instances_and_nothing_else() {
    let cases: &[(&str, &[&str], &[&str])] = &[
        (
            r#"{"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name", "age"]}"#,
            &[r#"{"name": "Ada", "age": 36}"#, r#"{"name":"A\"b\u00e9","age":-0}"#, r#"{ "name" : "", "age" : 7 }"#],
            &[
                r#"{"name": "Ada"}"#,
                r#"{"age": 36, "name": "Ada"}"#,
                r#"{"name": "Ada", "age": 3.5}"#,
                r#"{"name": 1, "age": 1}"#,
            ],
        ),
        (
            r#"{"properties": {"a": {"type": "boolean"}, "b": {"type": "null"}, "c": {"type": "number"}}, "required": ["c"]}"#,
            &[
                r#"{"c": 1e5}"#,
                r#"{"a": true, "c": -2.5}"#,
                r#"{"a": false, "b": null, "c": 0}"#,
                r#"{"b": null, "c": 1}"#,
            ],
            &[r#"{}"#, r#"{"a": true}"#, r#"{"c": 1, "a": true}"#, r#"{, "c": 1}"#, r#"{"c": 01}"#],
        ),
        (
            r#"{"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}}"#,
            &["{}", r#"{"x": 1}"#, r#"{"y": 2}"#, r#"{"x": 1, "y": 2}"#],
            &[r#"{"x": 1,}"#, r#"{,"y": 2}"#, r#"{"y": 2, "x": 1}"#],
        ),
        (
            r#"{"type": "array", "items": {"enum": ["red", 2, null, {"k": [1]}]}, "minItems": 1, "maxItems": 3}"#,
            &[r#"["red"]"#, r#"[2, null, {"k":[1]}]"#, r#"[ "red" ]"#],
            &["[]", r#"["red", 2, null, 2]"#, r#"["blue"]"#, r#"[{"k": [1]}]"#],
        ),
        (
            r##"{"$defs": {"p": {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}}, "required": ["id"]}},
                "type": "array", "items": {"$ref": "#/$defs/p"}}"##,
            &["[]", r#"[{"id": "123e4567-e89b-12d3-a456-426614174000"}]"#],
            &[r#"[{"id": "123e4567"}]"#],
        ),
        (
            r#"{"anyOf": [{"type": "string", "maxLength": 2}, {"type": ["integer", "null"]}, {"const": "long"}]}"#,
            &[r#""""#, r#""ab""#, "12", "null", r#""long""#],
            &[r#""abc""#, "1.5", "true"],
        ),
        (
            r#"{"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 130},
                "delta": {"type": "integer", "exclusiveMinimum": -3.5, "exclusiveMaximum": 2}},
                "required": ["age", "delta"]}"#,
            &[r#"{"age": 0, "delta": -3}"#, r#"{"age": 130, "delta": 1}"#, r#"{"age": 42, "delta": 0}"#],
            &[
                r#"{"age": -1, "delta": 0}"#,
                r#"{"age": 131, "delta": 0}"#,
                r#"{"age": 1, "delta": 2}"#,
                r#"{"age": 1, "delta": -4}"#,
            ],
        ),
        (r#"{"type": "integer", "minimum": 5, "exclusiveMinimum": true}"#, &["6", "1000000"], &["5", "-6", "4"]),
        (
            r#"{"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"}"#,
            &[r#""ada@example.com""#],
            &[r#""ada@example.org""#, r#""@x.com""#],
        ),
        (
            r#"{"type": "string", "format": "date"}"#,
            &[
                r#""2026-01-31""#,
                r#""2026-04-30""#,
                r#""2026-02-28""#,
                r#""2024-02-29""#,
                r#""2000-02-29""#,
                r#""1996-02-29""#,
                r#""0000-02-29""#,
            ],
            &[
                r#""2026-02-29""#,
                r#""1900-02-29""#,
                r#""2100-02-29""#,
                r#""2026-02-30""#,
                r#""2026-04-31""#,
                r#""2026-11-31""#,
                r#""2026-00-10""#,
                r#""2026-01-32""#,
            ],
        ),
        (
            r#"{"type": "string", "format": "date-time"}"#,
            &[r#""2026-11-30T12:00:00Z""#, r#""2026-02-28T23:59:59.5+01:00""#],
            &[r#""2026-13-01T00:00:00Z""#, r#""2026-11-30 12:00:00Z""#, r#""2026-11-30T12:00:00""#],
        ),
        (
            r#"{"oneOf": [{"type": "string"}, {"type": "null"}, {"enum": [1, 2]}]}"#,
            &[r#""x""#, "null", "2"],
            &["3", "true"],
        ),
        (
            r#"{"oneOf": [
                {"type": "object", "properties": {"kind": {"const": "a"}, "x": {"type": "integer"}},
                 "required": ["kind", "x"]},
                {"type": "object", "properties": {"kind": {"enum": ["b", "c"]}, "y": {"type": "string"}},
                 "required": ["kind"]}]}"#,
            &[r#"{"kind": "a", "x": 1}"#, r#"{"kind": "c"}"#, r#"{"kind": "b", "y": "z"}"#],
            &[r#"{"kind": "a"}"#, r#"{"kind": "d"}"#],
        ),
        (
            r#"{"type": "integer", "minimum": 9007199254740993, "exclusiveMaximum": 9007199254741000}"#,
            &["9007199254740993", "9007199254740999"],
            &["9007199254740992", "9007199254741000"],
        ),
        (r#"{"type": "string", "enum": ["a", 1, "b"]}"#, &[r#""a""#, r#""b""#], &["1"]),
        (
            r#"{"type": ["string", "null", "integer"], "maxLength": 3, "minimum": 0}"#,
            &[r#""abc""#, "null", "7"],
            &[r#""abcd""#, "-1"],
        ),
        (r#"{"type": "string"}"#, &[r#""\u00e9\ud7ff\ue000""#, r#""😀""#], &[r#""\ud800""#, r#""\udc00x""#]),
        (
            r#"{"type": "object", "additionalProperties": {"type": "integer"}}"#,
            &["{}", r#"{"a": 1, "b": 2}"#],
            &[r#"{"a": "x"}"#],
        ),
    ];
    for (schema, good, bad) in cases {
        let re = whole(&regex_of_schema(schema).unwrap_or_else(|e| panic!("{schema}: {e}")));
        for g in *good {
            assert!(re.is_match(g), "{schema} should accept {g}");
            serde_json::from_str::<Value>(g).expect("a valid case is JSON");
        }
        for b in *bad {
            assert!(!re.is_match(b), "{schema} should refuse {b}");
        }
    }
}

#[test]
fn any_object_is_json_objects_to_its_depth() {
    let re = whole(&regex_of_any_object());
    for g in ["{}", r#"{"a": [1, {"b": null}], "c": "d"}"#, r#"{"a": {"b": {"c": 1}}}"#] {
        assert!(re.is_match(g), "{g}");
    }
    for b in ["[]", "1", r#"{"a": }"#, r#"{"a": {"b": {"c": {"d": 1}}}}"#] {
        assert!(!re.is_match(b), "{b}");
    }
}

/// What a regex cannot honour is refused with its place, never left out.
/// A `$ref` is written out where it is used: a chain of definitions each using the one before twice
/// doubles the regex at every level (2 KB of schema, gigabytes of regex at 18 levels), and optional
/// members make it quadratic. Both are refused as the regex grows past the limit, naming the place.
#[test]
fn schemas_whose_regex_would_be_huge_are_refused_as_it_grows() {
    let mut defs = serde_json::Map::new();
    defs.insert("d0".into(), serde_json::json!({"type": "integer"}));
    for i in 1..=40 {
        let prev = format!("#/$defs/d{}", i - 1);
        defs.insert(
            format!("d{i}"),
            serde_json::json!({"properties": {"a": {"$ref": prev}, "b": {"$ref": prev}}, "required": ["a", "b"]}),
        );
    }
    let chain = serde_json::json!({"$defs": defs, "$ref": "#/$defs/d40"}).to_string();
    assert!(chain.len() < 5000);
    let e = regex_of_schema(&chain).unwrap_err();
    assert!(e.contains("too large: its regex passes 1 MiB") && e.contains("$ref=#/$defs/d40"), "{e}");

    let optional = |n: usize| {
        let props: serde_json::Map<String, Value> =
            (0..n).map(|i| (format!("p{i}"), serde_json::json!({"type": "string"}))).collect();
        serde_json::json!({"type": "object", "properties": props}).to_string()
    };
    assert!(regex_of_schema(&optional(100)).is_ok());
    let e = regex_of_schema(&optional(300)).unwrap_err();
    assert!(e.starts_with("the schema: too large"), "{e}");
}

/// The object members' regex, built in one pass, is the plain recursive definition (each optional member
/// present or not, a comma before all but the first written), and its length is worked out before it is
/// built; 20,000 members (a recursion that deep overflowed the stack) build.
#[test]
fn members_regex_is_its_definition_and_its_length_is_known_first() {
    fn reference(members: &[(String, bool)], i: usize, written: bool) -> String {
        let Some((member, required)) = members.get(i) else { return String::new() };
        if written {
            let this = format!("{WS},{WS}{member}");
            let rest = reference(members, i + 1, true);
            return if *required { format!("{this}{rest}") } else { format!("(?:{this})?{rest}") };
        }
        let with = format!("{member}{}", reference(members, i + 1, true));
        if *required {
            with
        } else {
            format!("(?:{with}|{})", reference(members, i + 1, false))
        }
    }
    let mut rng = crate::rng::Rng::new(5);
    for n in 0..40 {
        let members: Vec<(String, bool)> =
            (0..n).map(|i| ("m".repeat(1 + rng.below(30) as usize) + &i.to_string(), rng.below(3) > 0)).collect();
        let built = members_after(&members);
        assert_eq!(built, reference(&members, 0, false), "{members:?}");
        assert_eq!(members_len(&members), built.len(), "{members:?}");
    }
    let many: Vec<(String, bool)> = (0..20_000).map(|i| (format!("\"p{i}\":1"), true)).collect();
    assert_eq!(members_after(&many).len(), members_len(&many));
}

/// A chain of `$ref`s (or of `anyOf`s) thousands deep overflowed the builder's stack and aborted the server;
/// a `oneOf` of thousands of consts took a minute to check. Both are refused at once, naming the place.
#[test]
fn deep_chains_and_huge_one_ofs_are_refused() {
    for (wrap, n) in [("{\"$ref\": \"#/$defs/d{}\"}", 3000), ("{\"anyOf\": [{\"$ref\": \"#/$defs/d{}\"}]}", 1500)] {
        let mut defs = serde_json::Map::new();
        defs.insert("d0".into(), serde_json::json!({"type": "integer"}));
        for i in 1..=n {
            let def: Value = serde_json::from_str(&wrap.replace("{}", &(i - 1).to_string())).unwrap();
            defs.insert(format!("d{i}"), def);
        }
        let schema = serde_json::json!({"$defs": defs, "$ref": format!("#/$defs/d{n}")}).to_string();
        let e = regex_of_schema(&schema).unwrap_err();
        assert!(e.contains("nested more than 128 subschemas deep"), "{}", &e[e.len().saturating_sub(200)..]);
    }
    let consts: Vec<Value> = (0..20_000).map(|i| serde_json::json!({"const": i})).collect();
    let e = regex_of_schema(&serde_json::json!({"oneOf": consts}).to_string()).unwrap_err();
    assert!(e.starts_with("/oneOf: too many subschemas and values"), "{e}");
    let consts: Vec<Value> = (0..100).map(|i| serde_json::json!({"const": i})).collect();
    assert!(regex_of_schema(&serde_json::json!({"oneOf": consts}).to_string()).is_ok());
    // Definitions each using the one before twice (2^40 builds, and a regex past the budget), where no item
    // is ever written (`maxItems: 0`): not built at all.
    let mut defs = serde_json::Map::new();
    defs.insert("d0".into(), serde_json::json!({"type": "integer"}));
    for i in 1..=40 {
        let prev = format!("#/$defs/d{}", i - 1);
        let both = serde_json::json!({"anyOf": [{"$ref": prev}, {"$ref": prev}]});
        defs.insert(format!("d{i}"), serde_json::json!({"type": "array", "minItems": 1, "items": both}));
    }
    let schema = serde_json::json!({"$defs": defs, "type": "array", "maxItems": 0, "items": {"$ref": "#/$defs/d40"}});
    assert_eq!(regex_of_schema(&schema.to_string()).unwrap(), format!(r"\[{WS}{WS}\]"));
}

#[test]
fn unsupported_schemas_are_refused_by_name_and_place() {
    let cases = [
        (r#"{"type": "number", "minimum": 0}"#, "the schema: keyword `minimum` is not supported here"),
        (r#"{"type": "integer", "multipleOf": 2}"#, "keyword `multipleOf`"),
        (r#"{"type": "integer", "minimum": 3, "exclusiveMaximum": 3}"#, "no integer is within"),
        (r#"{"type": "integer", "maximum": 1e300}"#, "outside 64-bit integers"),
        (r#"{"type": "string", "maxLength": 4294967296}"#, "/maxLength: 4294967296 is past the largest count"),
        (r#"{"type": "array", "minItems": 18446744073709551615}"#, "/minItems: 18446744073709551615 is past"),
        (r#"{"type": "string", "minLength": 5, "maxLength": 2}"#, "the schema: maxLength 2 is below minLength 5"),
        // Past i64's low end, each rounds to exactly −2^63 as an f64 (and was taken as i64::MIN).
        (r#"{"type": "integer", "maximum": -9223372036854775809}"#, "/maximum: outside 64-bit integers"),
        (r#"{"type": "integer", "exclusiveMaximum": -9223372036854775808.0}"#, "outside 64-bit integers"),
        (r#"{"properties": {"a": {"type": "array", "uniqueItems": true}}}"#, "/properties/a: keyword `uniqueItems`"),
        (r#"{"type": "string", "format": "email"}"#, "/format: `email` is not supported"),
        (r##"{"$defs": {"n": {"properties": {"next": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"}"##, "is recursive"),
        (r#"{"$ref": "http://example.com/s.json"}"#, "is not in this document"),
        (r#"{"type": "object", "properties": {"a": {}}, "required": ["b"]}"#, "`b` is not among the properties"),
        (r#"{"type": "strin"}"#, "unknown type `strin`"),
        (r#"{"not": {"type": "string"}}"#, "keyword `not`"),
        (r#"{"oneOf": [{"type": "integer"}, {"type": "number"}]}"#, "/oneOf: subschemas 0 and 1 may both"),
        (r#"{"oneOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}"#, "/oneOf: subschemas 0 and 1 may both"),
        (r#"{"type": "object", "anyOf": [{"required": ["a"]}]}"#, "`type` beside `anyOf` is not supported"),
        (
            r#"{"oneOf": [{"properties": {"k": {"const": "a"}}, "required": ["k"]}, {"type": "string"}]}"#,
            "/oneOf: subschemas 0 and 1 may both",
        ),
        (
            r#"{"oneOf": [{"type": ["object", "null"], "properties": {"k": {"const": "a"}}, "required": ["k"]},
                          {"type": ["object", "null"], "properties": {"k": {"const": "b"}}, "required": ["k"]}]}"#,
            "/oneOf: subschemas 0 and 1 may both",
        ),
        (r#"{"oneOf": [{"const": {"a": 1}}, {"const": {"a": 1.0}}]}"#, "/oneOf: subschemas 0 and 1 may both"),
        (r#"{"type": ["number", "integer"], "minimum": 0}"#, "keyword `minimum` is not supported"),
        (r#"{"type": "integer", "minimum": true}"#, "/minimum: a number"),
        (r#"{"const": 1, "minimum": 0}"#, "keyword `minimum`"),
        (r#"{"type": "string", "enum": [1]}"#, "/enum: no value of the given type"),
        (r#"{"type": "string", "pattern": "a+", "format": "date"}"#, "`pattern` with `format`"),
        (r#"{"type": "string", "format": "uuid", "maxLength": 10}"#, "`format` with `maxLength`"),
        (r#"{"type": "string", "format": "date", "minLength": 11}"#, "`format` with `minLength`"),
        (
            r##"{"$defs": {"x": {"type": "string"}}, "properties": {"p": {"$id": "http://example.com/p",
                "$defs": {"x": {"type": "integer"}}, "$ref": "#/$defs/x"}}}"##,
            "/properties/p/$ref: under a subschema with an `$id` of its own",
        ),
        (
            r##"{"$defs": {"x": {"type": "string"}}, "properties": {"p": {"$id": "http://example.com/p",
                "type": "array", "items": {"$ref": "#/$defs/x"}}}}"##,
            "/properties/p/items/$ref: under a subschema with an `$id` of its own",
        ),
        (r#"{"type": "string", "format": "uuid", "maxLength": 10}"#, "the schema: `format` with `maxLength`"),
        (r#"{"type": "string", "pattern": "a\"b"}"#, "/pattern: the literal character"),
        ("false", "accepts nothing"),
        ("{", "not JSON"),
    ];
    for (schema, want) in cases {
        let err = regex_of_schema(schema).unwrap_err();
        assert!(err.contains(want), "{schema}: {err}");
    }
    // An `$id` with no `$ref` under it changes nothing (bundled schemas give their definitions one).
    for schema in [
        r##"{"$defs": {"x": {"$id": "http://x/x", "type": "string"}}, "$ref": "#/$defs/x"}"##,
        r##"{"properties": {"p": {"$id": "http://x/p", "type": "string"}}}"##,
    ] {
        assert!(regex_of_schema(schema).is_ok(), "{schema}");
    }
}

#[test]
fn escaped_text_matches_itself_only() {
    let s = r#"a.b*c{1}[x](y)|^$\ #&-~"#;
    let re = whole(&escape(s));
    assert!(re.is_match(s) && !re.is_match("aXb*c{1}[x](y)|^$\\ #&-~"));
}

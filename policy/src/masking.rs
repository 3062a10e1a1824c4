//! JSON response redaction and masking by JSON pointer.
//!
//! Pointers follow RFC 6901 (`~0` is `~`, `~1` is `/`), extended with one
//! rule: a segment that is exactly `*` matches every element of an array or
//! every member of an object.
//!
//! All pointers are matched in a single walk down the document. At each node
//! the walk carries the set of rules whose prefix matched so far, so it only
//! descends where some rule can still match, and its recursion depth is
//! bounded by the longest pointer (never by the depth of the response).
//! Decisions about array elements are made against the original indexes and
//! applied afterwards, so removing elements never shifts another rule's target.

use serde_json::{Map, Value};

/// Longest accepted pointer, in segments. Bounds the walk's recursion; it is
/// also the nesting depth serde_json accepts when parsing a response.
pub const MAX_POINTER_SEGMENTS: usize = 128;

/// What masked non-string values become.
const MASKED_PLACEHOLDER: &str = "****";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PointerError {
    #[error("pointer {0:?} must start with '/' (the whole document cannot be redacted or masked)")]
    MissingLeadingSlash(String),
    #[error("pointer {0:?} has a '~' not followed by '0' or '1'")]
    BadEscape(String),
    #[error("pointer {0:?} has more than {MAX_POINTER_SEGMENTS} segments")]
    TooDeep(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaskError {
    /// The response body is not JSON. Callers fail closed: a body that cannot
    /// be inspected cannot be shown to be free of the masked fields.
    #[error("response body is not valid JSON; it cannot be masked")]
    NotJson,
}

/// One pointer segment.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// `*`: every element or member.
    Any,
    /// A member name; `index` is set when the name is also a valid RFC 6901
    /// array index ("0", "17"; not "01" or "-"), so it can address arrays too.
    Name { name: String, index: Option<usize> },
}

impl Segment {
    fn parse(raw: &str, pointer: &str) -> Result<Self, PointerError> {
        if raw == "*" {
            return Ok(Self::Any);
        }
        let name = unescape(raw).ok_or_else(|| PointerError::BadEscape(pointer.to_owned()))?;
        let index = array_index(&name);
        Ok(Self::Name { name, index })
    }

    fn matches_member(&self, key: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Name { name, .. } => name == key,
        }
    }

    fn matches_element(&self, position: usize) -> bool {
        match self {
            Self::Any => true,
            Self::Name { index, .. } => *index == Some(position),
        }
    }
}

/// RFC 6901 unescaping; `None` on a `~` not followed by `0` or `1`.
fn unescape(raw: &str) -> Option<String> {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '~' {
            match chars.next() {
                Some('0') => out.push('~'),
                Some('1') => out.push('/'),
                _ => return None,
            }
        } else {
            out.push(c);
        }
    }
    Some(out)
}

fn array_index(name: &str) -> Option<usize> {
    let canonical = name == "0"
        || (!name.starts_with('0') && !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()));
    if canonical { name.parse().ok() } else { None }
}

fn parse_pointer(pointer: &str) -> Result<Vec<Segment>, PointerError> {
    let Some(rest) = pointer.strip_prefix('/') else {
        return Err(PointerError::MissingLeadingSlash(pointer.to_owned()));
    };
    let segments = rest
        .split('/')
        .map(|raw| Segment::parse(raw, pointer))
        .collect::<Result<Vec<_>, _>>()?;
    if segments.len() > MAX_POINTER_SEGMENTS {
        return Err(PointerError::TooDeep(pointer.to_owned()));
    }
    Ok(segments)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Redact,
    Mask { show_last: u32 },
}

#[derive(Debug)]
struct Rule {
    segments: Vec<Segment>,
    action: Action,
}

/// Redaction and masking rules compiled from a policy.
#[derive(Debug, Default)]
pub struct ResponseMask {
    rules: Vec<Rule>,
}

/// What happens to one child node, given the rules that reached it.
enum Outcome {
    Untouched,
    Remove,
    Mask {
        show_last: u32,
    },
    /// Some rules go deeper; indexes into `ResponseMask::rules`.
    Descend(Vec<usize>),
}

impl ResponseMask {
    /// `redact`: pointers whose targets are removed. `mask`: (pointer,
    /// show_last) whose string targets are replaced by `*` except the last
    /// `show_last` characters.
    pub fn compile(redact: &[String], mask: &[(String, u32)]) -> Result<Self, PointerError> {
        let redactions = redact.iter().map(|pointer| {
            Ok(Rule {
                segments: parse_pointer(pointer)?,
                action: Action::Redact,
            })
        });
        let masks = mask.iter().map(|(pointer, show_last)| {
            Ok(Rule {
                segments: parse_pointer(pointer)?,
                action: Action::Mask {
                    show_last: *show_last,
                },
            })
        });
        let rules = redactions.chain(masks).collect::<Result<_, _>>()?;
        Ok(Self { rules })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// `Ok(None)` when no pointer matched (the caller forwards the original
    /// bytes untouched); `Ok(Some(new_body))` otherwise. An empty mask returns
    /// `Ok(None)` without parsing the body.
    pub fn apply(&self, body: &[u8]) -> Result<Option<Vec<u8>>, MaskError> {
        if self.is_empty() {
            return Ok(None);
        }
        let mut value: Value =
            crate::json::parse_unambiguous(body).map_err(|_| MaskError::NotJson)?;
        if !self.apply_value(&mut value) {
            return Ok(None);
        }
        // Serialising a `Value` into memory cannot fail (keys are strings,
        // numbers are finite); should it ever, withholding the body is the
        // safe answer.
        serde_json::to_vec(&value)
            .map(Some)
            .map_err(|_| MaskError::NotJson)
    }

    /// Applies the rules in place. Returns true when any pointer matched a
    /// node, even one left as it was (a masked `null`, an already masked
    /// string): the caller then re-serialises rather than forwarding the
    /// original bytes, which could hold a duplicate key the parser dropped.
    pub fn apply_value(&self, value: &mut Value) -> bool {
        if self.rules.is_empty() {
            return false;
        }
        let all: Vec<usize> = (0..self.rules.len()).collect();
        self.walk(value, &all, 0)
    }

    /// `active` rules matched the path down to `node`, which sits at `depth`;
    /// every one of them has more than `depth` segments.
    fn walk(&self, node: &mut Value, active: &[usize], depth: usize) -> bool {
        match node {
            Value::Object(members) => self.walk_object(members, active, depth),
            Value::Array(elements) => self.walk_array(elements, active, depth),
            _ => false,
        }
    }

    fn walk_object(
        &self,
        members: &mut Map<String, Value>,
        active: &[usize],
        depth: usize,
    ) -> bool {
        let mut touched = false;
        let mut removed: Vec<String> = Vec::new();
        let mut visit = |key: &str, child: &mut Value| {
            let outcome = self.outcome(active, depth, |segment| segment.matches_member(key));
            touched |= self.carry_out(outcome, child, depth, || removed.push(key.to_owned()));
        };
        if self.any_wildcard(active, depth) {
            for (key, child) in members.iter_mut() {
                visit(key, child);
            }
        } else {
            // Direct lookups: a large object is not scanned for a few names.
            let mut names: Vec<&str> = active
                .iter()
                .filter_map(|&rule| match self.segment(rule, depth) {
                    Some(Segment::Name { name, .. }) => Some(name.as_str()),
                    _ => None,
                })
                .collect();
            names.sort_unstable();
            names.dedup();
            for name in names {
                if let Some(child) = members.get_mut(name) {
                    visit(name, child);
                }
            }
        }
        if !removed.is_empty() {
            // `retain` keeps member order should serde_json's `preserve_order`
            // be on, where `remove` would swap the last member into the gap.
            removed.sort_unstable();
            members.retain(|key, _| removed.binary_search(key).is_err());
        }
        touched
    }

    fn walk_array(&self, elements: &mut Vec<Value>, active: &[usize], depth: usize) -> bool {
        let mut touched = false;
        let mut removed = vec![false; elements.len()];
        let mut visit = |position: usize, child: &mut Value, removed: &mut [bool]| {
            let outcome = self.outcome(active, depth, |segment| segment.matches_element(position));
            touched |= self.carry_out(outcome, child, depth, || removed[position] = true);
        };
        if self.any_wildcard(active, depth) {
            for (position, child) in elements.iter_mut().enumerate() {
                visit(position, child, &mut removed);
            }
        } else {
            let mut positions: Vec<usize> = active
                .iter()
                .filter_map(|&rule| match self.segment(rule, depth) {
                    Some(Segment::Name { index, .. }) => *index,
                    _ => None,
                })
                .collect();
            positions.sort_unstable();
            positions.dedup();
            for position in positions {
                if let Some(child) = elements.get_mut(position) {
                    visit(position, child, &mut removed);
                }
            }
        }
        if removed.contains(&true) {
            // Removal decided on original positions, applied in one pass.
            let mut flags = removed.into_iter();
            elements.retain(|_| !flags.next().unwrap_or(false));
        }
        touched
    }

    /// Decides a child's fate from the active rules whose segment at `depth`
    /// matches it. Redact beats mask; of several masks the one revealing the
    /// least wins.
    fn outcome(
        &self,
        active: &[usize],
        depth: usize,
        matches: impl Fn(&Segment) -> bool,
    ) -> Outcome {
        let mut redact = false;
        let mut show_last: Option<u32> = None;
        let mut deeper = Vec::new();
        for &rule_index in active {
            let rule = &self.rules[rule_index];
            let Some(segment) = rule.segments.get(depth) else {
                continue;
            };
            if !matches(segment) {
                continue;
            }
            if rule.segments.len() > depth + 1 {
                deeper.push(rule_index);
                continue;
            }
            match rule.action {
                Action::Redact => redact = true,
                Action::Mask { show_last: n } => {
                    show_last = Some(show_last.map_or(n, |current| current.min(n)));
                }
            }
        }
        if redact {
            Outcome::Remove
        } else if let Some(show_last) = show_last {
            // Masking replaces the node, so rules below it have nothing left to hit.
            Outcome::Mask { show_last }
        } else if deeper.is_empty() {
            Outcome::Untouched
        } else {
            Outcome::Descend(deeper)
        }
    }

    fn carry_out(
        &self,
        outcome: Outcome,
        child: &mut Value,
        depth: usize,
        remove: impl FnOnce(),
    ) -> bool {
        match outcome {
            Outcome::Untouched => false,
            Outcome::Remove => {
                remove();
                true
            }
            Outcome::Mask { show_last } => {
                mask_value(child, show_last);
                true
            }
            Outcome::Descend(rules) => self.walk(child, &rules, depth + 1),
        }
    }

    fn segment(&self, rule: usize, depth: usize) -> Option<&Segment> {
        self.rules.get(rule).and_then(|r| r.segments.get(depth))
    }

    fn any_wildcard(&self, active: &[usize], depth: usize) -> bool {
        active
            .iter()
            .any(|&rule| matches!(self.segment(rule, depth), Some(Segment::Any)))
    }
}

/// Masks one node in place; see the module docs for the per-type rules.
fn mask_value(value: &mut Value, show_last: u32) {
    match value {
        Value::Null => {}
        Value::String(text) => *text = mask_text(text, show_last),
        Value::Bool(_) | Value::Number(_) | Value::Object(_) | Value::Array(_) => {
            *value = Value::String(MASKED_PLACEHOLDER.to_owned());
        }
    }
}

/// Keeps the last `show_last` characters (Unicode scalar values) and stars
/// the rest. A string no longer than `show_last` is starred entirely: showing
/// "the last 4" of a 4-character PIN would show the PIN.
fn mask_text(text: &str, show_last: u32) -> String {
    let length = text.chars().count();
    let shown = usize::try_from(show_last).unwrap_or(usize::MAX);
    if length <= shown {
        return "*".repeat(length);
    }
    let hidden = length - shown;
    let mut out = String::with_capacity(text.len());
    out.extend(std::iter::repeat_n('*', hidden));
    out.extend(text.chars().skip(hidden));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn masks(list: &[(&str, u32)]) -> Vec<(String, u32)> {
        list.iter().map(|(p, n)| ((*p).to_owned(), *n)).collect()
    }

    fn run(redact: &[&str], mask: &[(&str, u32)], input: Value) -> Value {
        let rules = ResponseMask::compile(&strings(redact), &masks(mask)).unwrap();
        let mut value = input;
        rules.apply_value(&mut value);
        value
    }

    #[test]
    fn response_mask_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ResponseMask>();
    }

    #[test]
    fn compile_rejects_bad_pointers() {
        assert_eq!(
            ResponseMask::compile(&strings(&["a/b"]), &[]).unwrap_err(),
            PointerError::MissingLeadingSlash("a/b".into())
        );
        assert_eq!(
            ResponseMask::compile(&[], &masks(&[("", 4)])).unwrap_err(),
            PointerError::MissingLeadingSlash(String::new())
        );
        for bad in ["/a~2", "/a~", "/~/b"] {
            assert_eq!(
                ResponseMask::compile(&strings(&[bad]), &[]).unwrap_err(),
                PointerError::BadEscape(bad.into())
            );
        }
        let deep = "/a".repeat(MAX_POINTER_SEGMENTS + 1);
        assert!(matches!(
            ResponseMask::compile(&strings(&[&deep]), &[]),
            Err(PointerError::TooDeep(_))
        ));
    }

    #[test]
    fn empty_pattern_lists_compile_to_an_empty_mask() {
        let rules = ResponseMask::compile(&[], &[]).unwrap();
        assert!(rules.is_empty());
        assert_eq!(rules.apply(b"not even json"), Ok(None));
    }

    #[test]
    fn nested_pointers_redact_and_mask() {
        let out = run(
            &["/user/password"],
            &[("/user/card/number", 4)],
            json!({"user": {"name": "ada", "password": "hunter2",
                            "card": {"number": "4111111111111111", "exp": "12/30"}}}),
        );
        assert_eq!(
            out,
            json!({"user": {"name": "ada",
                            "card": {"number": "************1111", "exp": "12/30"}}})
        );
    }

    #[test]
    fn wildcard_over_array_and_object() {
        let out = run(
            &["/accounts/*/token"],
            &[("/items/*/card/number", 4)],
            json!({
                "items": [{"card": {"number": "4111111111111111"}},
                          {"card": {"number": "5500000000000004"}},
                          {"other": true}],
                "accounts": {"a": {"token": "t1", "id": 1}, "b": {"token": "t2", "id": 2}}
            }),
        );
        assert_eq!(
            out,
            json!({
                "items": [{"card": {"number": "************1111"}},
                          {"card": {"number": "************0004"}},
                          {"other": true}],
                "accounts": {"a": {"id": 1}, "b": {"id": 2}}
            })
        );
    }

    #[test]
    fn numeric_segment_addresses_array_index_and_member_name() {
        let out = run(
            &["/list/1", "/map/1", "/list/01"],
            &[],
            json!({"list": ["a", "b", "c"], "map": {"1": "x", "01": "y"}}),
        );
        assert_eq!(out, json!({"list": ["a", "c"], "map": {"01": "y"}}));
    }

    #[test]
    fn escapes_tilde_and_slash() {
        let out = run(
            &["/a~1b"],
            &[("/m~0n", 0)],
            json!({"a/b": 1, "a": {"b": 2}, "m~n": "secret", "m": "keep"}),
        );
        assert_eq!(out, json!({"a": {"b": 2}, "m~n": "******", "m": "keep"}));
    }

    #[test]
    fn literal_star_member_is_only_reachable_by_wildcard() {
        // `*` is always the wildcard; documented limitation.
        let out = run(&["/*"], &[], json!({"*": 1, "x": 2}));
        assert_eq!(out, json!({}));
    }

    #[test]
    fn show_last_edge_cases() {
        assert_eq!(mask_text("secret", 0), "******");
        assert_eq!(mask_text("1234", 4), "****");
        assert_eq!(mask_text("123", 4), "***");
        assert_eq!(mask_text("123456", 4), "**3456");
        assert_eq!(mask_text("", 4), "");
        assert_eq!(mask_text("abc", u32::MAX), "***");
        // Characters, not bytes: é and 😀 count once each.
        assert_eq!(mask_text("café😀", 2), "***é😀");
        assert_eq!(mask_text("日本語", 1), "**語");
    }

    #[test]
    fn mask_non_strings() {
        let out = run(
            &[],
            &[("/n", 4), ("/b", 4), ("/z", 4), ("/o", 4), ("/a", 4)],
            json!({"n": 12345678, "b": true, "z": null, "o": {"k": "v"}, "a": [1, 2]}),
        );
        assert_eq!(
            out,
            json!({"n": "****", "b": "****", "z": null, "o": "****", "a": "****"})
        );
    }

    #[test]
    fn smallest_show_last_wins_when_masks_overlap() {
        let out = run(
            &[],
            &[("/items/*", 4), ("/items/0", 1)],
            json!({"items": ["abcdef", "ghijkl"]}),
        );
        assert_eq!(out, json!({"items": ["*****f", "**ijkl"]}));
    }

    #[test]
    fn redact_array_elements_by_wildcard_and_index() {
        assert_eq!(
            run(&["/items/*"], &[], json!({"items": [1, 2, 3], "k": 0})),
            json!({"items": [], "k": 0})
        );
        // Index rules refer to original positions: 0 and 2 go, 1 and 3 stay.
        assert_eq!(
            run(
                &["/items/0", "/items/2"],
                &[],
                json!({"items": ["a", "b", "c", "d"]})
            ),
            json!({"items": ["b", "d"]})
        );
        // A removal does not shift another rule's target.
        assert_eq!(
            run(
                &["/items/0", "/items/*/secret"],
                &[("/items/2/pan", 2)],
                json!({"items": [{"secret": 1}, {"secret": 2, "ok": 1}, {"pan": "123456"}]})
            ),
            json!({"items": [{"ok": 1}, {"pan": "****56"}]})
        );
    }

    #[test]
    fn redact_wins_over_mask() {
        assert_eq!(
            run(
                &["/card"],
                &[("/card", 4)],
                json!({"card": "4111111111111111"})
            ),
            json!({})
        );
        assert_eq!(
            run(
                &["/items/1"],
                &[("/items/*", 0)],
                json!({"items": ["aa", "bb", "cc"]})
            ),
            json!({"items": ["**", "**"]})
        );
        // Redaction below a masked node: the node is masked whole.
        assert_eq!(
            run(
                &["/card/number"],
                &[("/card", 0)],
                json!({"card": {"number": "1"}})
            ),
            json!({"card": "****"})
        );
    }

    #[test]
    fn no_match_returns_none() {
        let rules =
            ResponseMask::compile(&strings(&["/a/b", "/x/*/y"]), &masks(&[("/c", 4)])).unwrap();
        let body = br#"{"a": {"c": 1}, "x": [1, {"z": 2}], "b": 3}"#;
        assert_eq!(rules.apply(body), Ok(None));
        // A pointer whose prefix hits a scalar matches nothing either.
        assert_eq!(rules.apply(br#"{"a": "scalar"}"#), Ok(None));
    }

    #[test]
    fn match_returns_reserialised_body() {
        let rules = ResponseMask::compile(&strings(&["/token"]), &[]).unwrap();
        let out = rules
            .apply(br#"{"token": "abc", "id": 7}"#)
            .unwrap()
            .unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&out).unwrap(),
            json!({"id": 7})
        );
    }

    #[test]
    fn matched_but_unchanged_still_reserialises() {
        // A matched null stays null, but the body is still re-serialised.
        let rules = ResponseMask::compile(&[], &masks(&[("/ssn", 4)])).unwrap();
        let out = rules
            .apply(br#"{"ssn": null,   "name": "x"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out), r#"{"name":"x","ssn":null}"#);
    }

    #[test]
    fn not_json_is_an_error() {
        let rules = ResponseMask::compile(&strings(&["/a"]), &[]).unwrap();
        assert_eq!(rules.apply(b"<html>"), Err(MaskError::NotJson));
        // Two copies of a member: which one the client reads is unknowable.
        assert_eq!(
            rules.apply(br#"{"ssn": "123-45-6789", "ssn": null}"#),
            Err(MaskError::NotJson)
        );
        assert_eq!(rules.apply(b""), Err(MaskError::NotJson));
        assert_eq!(rules.apply(b"{\"a\": 1} trailing"), Err(MaskError::NotJson));
        let mut deep = vec![b'['; 10_000];
        deep.extend(vec![b']'; 10_000]);
        assert_eq!(rules.apply(&deep), Err(MaskError::NotJson));
    }

    #[test]
    fn top_level_array_and_scalar_bodies() {
        let rules = ResponseMask::compile(&strings(&["/*/pw"]), &masks(&[("/0", 2)])).unwrap();
        let out = rules
            .apply(br#"[{"pw": 1, "n": 2}, "abc"]"#)
            .unwrap()
            .unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&out).unwrap(),
            json!(["****", "abc"])
        );
        assert_eq!(rules.apply(b"42"), Ok(None));
    }

    #[test]
    fn documented_example_output() {
        let rules = ResponseMask::compile(
            &strings(&["/owner/ssn", "/accounts/*/iban"]),
            &masks(&[("/accounts/*/card/number", 4)]),
        )
        .unwrap();
        let body = br#"{"owner": {"name": "Ada", "ssn": "123-45-6789"},
                        "accounts": [{"iban": "GB82WEST", "card": {"number": "4111111111111111"}}]}"#;
        let out = rules.apply(body).unwrap().unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"accounts":[{"card":{"number":"************1111"}}],"owner":{"name":"Ada"}}"#
        );
    }

    /// Test-only resolver: does any node match the (wildcard) pointer?
    fn resolves(value: &Value, segments: &[Segment]) -> bool {
        let Some((first, rest)) = segments.split_first() else {
            return true;
        };
        match value {
            Value::Object(members) => members
                .iter()
                .any(|(k, v)| first.matches_member(k) && resolves(v, rest)),
            Value::Array(elements) => elements
                .iter()
                .enumerate()
                .any(|(i, v)| first.matches_element(i) && resolves(v, rest)),
            _ => false,
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "[a-z0-9é]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(5, 48, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[abc]", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Pointers over names and wildcards only: with numeric segments a
    /// removed element's index is legitimately taken by its successor.
    fn arb_pointer() -> impl Strategy<Value = String> {
        prop::collection::vec(prop_oneof!["[abc]", Just("*".to_owned())], 1..4)
            .prop_map(|segments| format!("/{}", segments.join("/")))
    }

    proptest! {
        #[test]
        fn apply_never_panics_on_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..256)) {
            let rules = ResponseMask::compile(
                &strings(&["/a", "/*/b", "/0"]),
                &masks(&[("/*", 2), ("/c/*/d", 0)]),
            ).unwrap();
            let _ = rules.apply(&body);
        }

        #[test]
        fn apply_never_panics_on_json_like_text(body in r#"[\[\]{}",:0-9a-c *~/\\]{0,64}"#) {
            let rules = ResponseMask::compile(&strings(&["/*/*"]), &masks(&[("/a", 1)])).unwrap();
            let _ = rules.apply(body.as_bytes());
        }

        #[test]
        fn no_redacted_pointer_resolves_after_apply(
            doc in arb_json(),
            redact in prop::collection::vec(arb_pointer(), 1..4),
            mask in prop::collection::vec((arb_pointer(), 0u32..6), 0..3),
        ) {
            let rules = ResponseMask::compile(&redact, &mask).unwrap();
            let body = serde_json::to_vec(&doc).unwrap();
            let out = match rules.apply(&body).unwrap() {
                Some(bytes) => serde_json::from_slice::<Value>(&bytes).unwrap(),
                None => doc,
            };
            for pointer in &redact {
                let segments = parse_pointer(pointer).unwrap();
                prop_assert!(!resolves(&out, &segments), "{pointer} still resolves in {out}");
            }
        }
    }
}

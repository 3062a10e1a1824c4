//! Path pattern index for route matching.
//!
//! Given an already normalized request path (see [`crate::normalize`]), finds
//! every route value whose path pattern matches, without scanning all
//! patterns: exact paths are one hash lookup, prefixes are probed at each `/`
//! boundary of the path, and templates walk a segment trie.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};

use crate::normalize::{NormalizeOptions, is_normalized_with};

/// A route's path match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathPattern {
    /// Byte-for-byte equality with the normalized path.
    Exact(String),
    /// Whole-path match where `{name}` segments match one non-empty segment.
    Template(String),
    /// Segment-aware prefix: `/api` matches `/api`, `/api/` and `/api/x`, not `/apix`.
    Prefix(String),
}

/// Why a pattern was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatternError {
    #[error(
        "path pattern {pattern:?} is not in normal form (it would never match a normalized path)"
    )]
    NotNormalized { pattern: String },
    #[error("template segment {segment:?} must be a whole `{{name}}` segment")]
    ParamNotWholeSegment { segment: String },
    #[error("template parameter in {pattern:?} has an empty name")]
    EmptyParamName { pattern: String },
    #[error(
        "template parameter name {name:?} is invalid (use ASCII letters, digits and '_', not starting with a digit)"
    )]
    InvalidParamName { name: String },
    #[error("template parameter name {name:?} appears more than once")]
    DuplicateParamName { name: String },
}

/// The kind of pattern a match came from, lowest precedence first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MatchKind {
    Any,
    Prefix,
    Template,
    Exact,
}

/// Precedence of a match: higher sorts first. Exact > Template > Prefix > Any;
/// within a kind, longer (more specific) before shorter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Specificity {
    // Field order is the comparison order.
    kind: MatchKind,
    /// Exact: path length. Prefix: prefix length without trailing slash.
    /// Template: number of literal segments.
    primary: u32,
    /// Template: total bytes of literal segments. Otherwise 0.
    secondary: u32,
}

impl Specificity {
    /// The kind of pattern that matched.
    pub fn kind(&self) -> MatchKind {
        self.kind
    }

    const ANY: Specificity = Specificity {
        kind: MatchKind::Any,
        primary: 0,
        secondary: 0,
    };

    fn new(kind: MatchKind, primary: usize, secondary: usize) -> Self {
        Specificity {
            kind,
            primary: saturating_u32(primary),
            secondary: saturating_u32(secondary),
        }
    }
}

fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Values sharing one pattern, with the pattern's precomputed specificity.
struct Slot<T> {
    specificity: Specificity,
    values: Vec<T>,
}

impl<T> Slot<T> {
    fn new(specificity: Specificity) -> Self {
        Slot {
            specificity,
            values: Vec::new(),
        }
    }

    fn emit<'s>(&'s self, f: &mut impl FnMut(&'s T, Specificity)) {
        for value in &self.values {
            f(value, self.specificity);
        }
    }
}

/// One node of the template trie: a position after some number of segments.
struct TemplateNode<T> {
    literals: HashMap<Box<str>, TemplateNode<T>, SeededFxBuild>,
    param: Option<Box<TemplateNode<T>>>,
    /// Templates ending exactly here.
    terminal: Option<Slot<T>>,
}

impl<T> TemplateNode<T> {
    fn new(hasher: SeededFxBuild) -> Self {
        TemplateNode {
            literals: HashMap::with_hasher(hasher),
            param: None,
            terminal: None,
        }
    }

    /// `rest` is the path after the `/` that starts the next segment.
    /// Each trie node is reached by at most one walk, so the cost is bounded
    /// by the trie size even though both literal and param children are tried.
    fn walk<'s>(&'s self, rest: &str, f: &mut impl FnMut(&'s T, Specificity)) {
        let (segment, next) = match rest.split_once('/') {
            Some((segment, next)) => (segment, Some(next)),
            None => (rest, None),
        };
        if let Some(child) = self.literals.get(segment) {
            child.finish_or_walk(next, f);
        }
        if let Some(child) = &self.param
            && !segment.is_empty()
        {
            child.finish_or_walk(next, f);
        }
    }

    fn finish_or_walk<'s>(&'s self, next: Option<&str>, f: &mut impl FnMut(&'s T, Specificity)) {
        match next {
            None => {
                if let Some(slot) = &self.terminal {
                    slot.emit(f);
                }
            }
            Some(rest) => self.walk(rest, f),
        }
    }
}

/// Finds the values whose path pattern matches a normalized path.
pub struct PathIndex<T> {
    exact: HashMap<Box<str>, Slot<T>, SeededFxBuild>,
    /// Keyed by the prefix without its trailing slash (`/` is keyed by "").
    prefixes: HashMap<Box<str>, Slot<T>, SeededFxBuild>,
    /// `prefix_lengths[n]` is true when some prefix key has `n` bytes: most
    /// `/` boundaries of a path can then be skipped without hashing.
    prefix_lengths: Vec<bool>,
    templates: TemplateNode<T>,
    any: Vec<T>,
    len: usize,
    hasher: SeededFxBuild,
}

impl<T> Default for PathIndex<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> PathIndex<T> {
    pub fn new() -> Self {
        let hasher = SeededFxBuild::random();
        PathIndex {
            exact: HashMap::with_hasher(hasher),
            prefixes: HashMap::with_hasher(hasher),
            prefix_lengths: Vec::new(),
            templates: TemplateNode::new(hasher),
            any: Vec::new(),
            len: 0,
            hasher,
        }
    }

    /// Adds `value` under `pattern`. Several values may share a pattern.
    pub fn insert(&mut self, pattern: PathPattern, value: T) -> Result<(), PatternError> {
        match pattern {
            PathPattern::Exact(path) => {
                check_normalized(&path)?;
                let specificity = Specificity::new(MatchKind::Exact, path.len(), 0);
                self.exact
                    .entry(path.into_boxed_str())
                    .or_insert_with(|| Slot::new(specificity))
                    .values
                    .push(value);
            }
            PathPattern::Prefix(prefix) => {
                check_normalized(&prefix)?;
                let key = prefix.strip_suffix('/').unwrap_or(&prefix);
                let specificity = Specificity::new(MatchKind::Prefix, key.len(), 0);
                if self.prefix_lengths.len() <= key.len() {
                    self.prefix_lengths.resize(key.len() + 1, false);
                }
                self.prefix_lengths[key.len()] = true;
                self.prefixes
                    .entry(key.into())
                    .or_insert_with(|| Slot::new(specificity))
                    .values
                    .push(value);
            }
            PathPattern::Template(template) => {
                let segments = parse_template(&template)?;
                let literal_count = segments.iter().filter(|s| s.is_some()).count();
                let literal_bytes = segments.iter().flatten().map(|s| s.len()).sum();
                let specificity =
                    Specificity::new(MatchKind::Template, literal_count, literal_bytes);
                let hasher = self.hasher;
                let mut node = &mut self.templates;
                for segment in segments {
                    node = match segment {
                        Some(literal) => node
                            .literals
                            .entry(literal.into())
                            .or_insert_with(|| TemplateNode::new(hasher)),
                        None => node
                            .param
                            .get_or_insert_with(|| Box::new(TemplateNode::new(hasher))),
                    };
                }
                node.terminal
                    .get_or_insert_with(|| Slot::new(specificity))
                    .values
                    .push(value);
            }
        }
        self.len += 1;
        Ok(())
    }

    /// A value that matches every path, with the lowest precedence (a route with no path match).
    pub fn insert_any(&mut self, value: T) {
        self.any.push(value);
        self.len += 1;
    }

    /// Calls `f` for every value whose pattern matches the (already normalized) `path`, in any order, with its Specificity.
    pub fn for_each_match<'s>(&'s self, path: &str, mut f: impl FnMut(&'s T, Specificity)) {
        if let Some(slot) = self.exact.get(path) {
            slot.emit(&mut f);
        }
        self.prefix_matches(path, &mut f);
        if let Some(rest) = path.strip_prefix('/') {
            self.templates.walk(rest, &mut f);
        }
        for value in &self.any {
            f(value, Specificity::ANY);
        }
    }

    /// Probes the prefix map with the path cut at every `/` boundary, plus
    /// the whole path: exactly the keys a segment-aware prefix can have.
    fn prefix_matches<'s>(&'s self, path: &str, f: &mut impl FnMut(&'s T, Specificity)) {
        if self.prefixes.is_empty() {
            return;
        }
        let has_length = |n: usize| self.prefix_lengths.get(n).copied().unwrap_or(false);
        // A key is `path[..i]` with `path[i] == '/'`, so `i` never exceeds
        // the longest key.
        for (i, b) in path.bytes().enumerate().take(self.prefix_lengths.len()) {
            if b == b'/'
                && has_length(i)
                && let Some(slot) = path.get(..i).and_then(|key| self.prefixes.get(key))
            {
                slot.emit(f);
            }
        }
        // The whole path is a key unless it ends in '/', in which case the
        // loop already probed it without the slash.
        if !path.ends_with('/')
            && has_length(path.len())
            && let Some(slot) = self.prefixes.get(path)
        {
            slot.emit(f);
        }
    }

    /// Number of values stored (a value inserted twice counts twice).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Patterns may contain `%2F`/`%5C` and `;` so that listeners running with
/// `allow_encoded_slash` or `allow_path_parameters` can route on them; under
/// default options no request path contains them, so such a pattern simply
/// never matches.
const PATTERN_OPTIONS: NormalizeOptions = NormalizeOptions {
    allow_encoded_slash: true,
    allow_path_parameters: true,
};

fn check_normalized(pattern: &str) -> Result<(), PatternError> {
    if is_normalized_with(pattern, &PATTERN_OPTIONS) {
        Ok(())
    } else {
        Err(PatternError::NotNormalized {
            pattern: pattern.to_owned(),
        })
    }
}

/// Splits a template into segments: `Some(literal)` or `None` for `{name}`.
fn parse_template(template: &str) -> Result<Vec<Option<&str>>, PatternError> {
    let Some(body) = template.strip_prefix('/') else {
        return Err(PatternError::NotNormalized {
            pattern: template.to_owned(),
        });
    };
    let mut segments = Vec::new();
    let mut names: Vec<&str> = Vec::new();
    // Params replaced by a placeholder, so the literal skeleton can be
    // checked with the same rules as any other pattern.
    let mut skeleton = String::with_capacity(template.len());
    for segment in body.split('/') {
        skeleton.push('/');
        if !segment.contains(['{', '}']) {
            skeleton.push_str(segment);
            segments.push(Some(segment));
            continue;
        }
        let name = segment
            .strip_prefix('{')
            .and_then(|s| s.strip_suffix('}'))
            .filter(|name| !name.contains(['{', '}']))
            .ok_or_else(|| PatternError::ParamNotWholeSegment {
                segment: segment.to_owned(),
            })?;
        if name.is_empty() {
            return Err(PatternError::EmptyParamName {
                pattern: template.to_owned(),
            });
        }
        if !is_param_name(name) {
            return Err(PatternError::InvalidParamName {
                name: name.to_owned(),
            });
        }
        if names.contains(&name) {
            return Err(PatternError::DuplicateParamName {
                name: name.to_owned(),
            });
        }
        names.push(name);
        skeleton.push('p');
        segments.push(None);
    }
    check_normalized(&skeleton).map_err(|_| PatternError::NotNormalized {
        pattern: template.to_owned(),
    })?;
    Ok(segments)
}

fn is_param_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

// ---------------------------------------------------------------------------
// Hashing

/// A small multiply-rotate hasher (Fx-style) with a per-index random seed.
///
/// SipHash costs more than the rest of a lookup for short keys. Keys are
/// policy-controlled (requests can only probe, not insert), and the random
/// seed keeps bucket placement unpredictable to clients anyway.
#[derive(Clone, Copy, Debug)]
struct SeededFxBuild {
    seed: u64,
}

impl SeededFxBuild {
    fn random() -> Self {
        SeededFxBuild {
            seed: RandomState::new().build_hasher().finish(),
        }
    }
}

impl BuildHasher for SeededFxBuild {
    type Hasher = FxHasher;
    fn build_hasher(&self) -> FxHasher {
        FxHasher { hash: self.seed }
    }
}

struct FxHasher {
    hash: u64,
}

const FX_K: u64 = 0xf135_7aea_2e62_a9c5;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(26) ^ word).wrapping_mul(FX_K);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let tail = chunks.remainder();
        let mut word = [0u8; 8];
        word[..tail.len()].copy_from_slice(tail);
        // Length in the top byte keeps "a" and "a\0" apart.
        self.add(u64::from_le_bytes(word) ^ ((tail.len() as u64) << 56));
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn finish(&self) -> u64 {
        // Final avalanche so the low bits hashbrown uses depend on all input.
        let h = self.hash;
        (h ^ (h >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (h >> 32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(patterns: &[(PathPattern, &'static str)]) -> PathIndex<&'static str> {
        let mut index = PathIndex::new();
        for (pattern, value) in patterns {
            index.insert(pattern.clone(), *value).unwrap();
        }
        index
    }

    /// Matches sorted by precedence, highest first.
    fn matches(index: &PathIndex<&'static str>, path: &str) -> Vec<&'static str> {
        let mut found = Vec::new();
        index.for_each_match(path, |v, s| found.push((s, *v)));
        found.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
        found.into_iter().map(|(_, v)| v).collect()
    }

    fn exact(s: &str) -> PathPattern {
        PathPattern::Exact(s.to_owned())
    }
    fn template(s: &str) -> PathPattern {
        PathPattern::Template(s.to_owned())
    }
    fn prefix(s: &str) -> PathPattern {
        PathPattern::Prefix(s.to_owned())
    }

    #[test]
    fn precedence_exact_template_prefix_any() {
        let mut idx = index(&[
            (prefix("/"), "root"),
            (prefix("/orders"), "orders-prefix"),
            (prefix("/orders/42"), "order42-prefix"),
            (template("/orders/{id}"), "order-template"),
            (template("/{kind}/{id}"), "generic-template"),
            (exact("/orders/42"), "order42-exact"),
        ]);
        idx.insert_any("any");
        assert_eq!(
            matches(&idx, "/orders/42"),
            [
                "order42-exact",
                "order-template",
                "generic-template",
                "order42-prefix",
                "orders-prefix",
                "root",
                "any"
            ]
        );
        assert_eq!(
            matches(&idx, "/orders/7"),
            [
                "order-template",
                "generic-template",
                "orders-prefix",
                "root",
                "any"
            ]
        );
    }

    #[test]
    fn specificity_orders_as_documented() {
        let e = Specificity::new(MatchKind::Exact, 1, 0);
        let t = Specificity::new(MatchKind::Template, 9, 99);
        let p_long = Specificity::new(MatchKind::Prefix, 10, 0);
        let p_short = Specificity::new(MatchKind::Prefix, 2, 0);
        assert!(e > t && t > p_long && p_long > p_short && p_short > Specificity::ANY);
        assert_eq!(e.kind(), MatchKind::Exact);
    }

    #[test]
    fn exact_is_byte_equality() {
        let idx = index(&[(exact("/a/b"), "ab"), (exact("/a/b/"), "ab/")]);
        assert_eq!(matches(&idx, "/a/b"), ["ab"]);
        assert_eq!(matches(&idx, "/a/b/"), ["ab/"]);
        assert!(matches(&idx, "/A/b").is_empty());
        assert!(matches(&idx, "/a").is_empty());
    }

    #[test]
    fn template_params_match_one_non_empty_segment() {
        let idx = index(&[
            (template("/orders/{id}/items/{item}"), "item"),
            (template("/orders/{id}"), "order"),
            (template("/orders/{id}/"), "order-slash"),
        ]);
        assert_eq!(matches(&idx, "/orders/1/items/2"), ["item"]);
        assert_eq!(matches(&idx, "/orders/1"), ["order"]);
        assert_eq!(matches(&idx, "/orders/1/"), ["order-slash"]);
        assert!(matches(&idx, "/orders/").is_empty());
        assert!(matches(&idx, "/orders").is_empty());
        assert!(matches(&idx, "/orders/1/items").is_empty());
        assert!(matches(&idx, "/orders/1/items/2/3").is_empty());
        assert!(matches(&idx, "/orders/1/items/").is_empty());
        assert!(matches(&idx, "/Orders/1").is_empty());
    }

    #[test]
    fn template_literal_beats_param_at_same_depth() {
        let idx = index(&[
            (template("/users/{id}"), "param"),
            (template("/users/me"), "literal"),
            (template("/{a}/{b}"), "all-params"),
        ]);
        assert_eq!(
            matches(&idx, "/users/me"),
            ["literal", "param", "all-params"]
        );
        assert_eq!(matches(&idx, "/users/5"), ["param", "all-params"]);
    }

    #[test]
    fn template_backtracks_between_literal_and_param() {
        let idx = index(&[(template("/a/b/c"), "lit"), (template("/a/{x}/d"), "par")]);
        assert_eq!(matches(&idx, "/a/b/d"), ["par"]);
        assert_eq!(matches(&idx, "/a/b/c"), ["lit"]);
    }

    #[test]
    fn prefix_is_segment_aware() {
        let idx = index(&[(prefix("/api"), "api"), (prefix("/api/"), "api/")]);
        for path in ["/api", "/api/", "/api/x/y"] {
            assert_eq!(matches(&idx, path), ["api", "api/"], "{path}");
        }
        for path in ["/apix", "/ap", "/", "/x/api"] {
            assert!(matches(&idx, path).is_empty(), "{path}");
        }
    }

    #[test]
    fn root_prefix_matches_everything() {
        let idx = index(&[(prefix("/"), "root")]);
        for path in ["/", "/a", "/a/b/", "/%20"] {
            assert_eq!(matches(&idx, path), ["root"], "{path}");
        }
    }

    #[test]
    fn longer_prefix_sorts_before_shorter() {
        let idx = index(&[
            (prefix("/a"), "a"),
            (prefix("/a/b/c"), "abc"),
            (prefix("/a/b"), "ab"),
        ]);
        assert_eq!(matches(&idx, "/a/b/c/d"), ["abc", "ab", "a"]);
        assert_eq!(matches(&idx, "/a/b/cd"), ["ab", "a"]);
    }

    #[test]
    fn several_values_share_a_pattern() {
        let mut idx = PathIndex::new();
        idx.insert(exact("/x"), 1).unwrap();
        idx.insert(exact("/x"), 2).unwrap();
        idx.insert(template("/{p}"), 3).unwrap();
        idx.insert(template("/{q}"), 4).unwrap();
        idx.insert(prefix("/x"), 5).unwrap();
        idx.insert(prefix("/x/"), 6).unwrap();
        let mut found = Vec::new();
        idx.for_each_match("/x", |v, _| found.push(*v));
        found.sort_unstable();
        assert_eq!(found, [1, 2, 3, 4, 5, 6]);
        assert_eq!(idx.len(), 6);
    }

    #[test]
    fn insert_any_matches_every_path_last() {
        let mut idx = PathIndex::new();
        assert!(idx.is_empty());
        idx.insert_any("any");
        assert_eq!(idx.len(), 1);
        assert!(!idx.is_empty());
        let mut found = Vec::new();
        idx.for_each_match("/whatever/x", |v, s| found.push((*v, s.kind())));
        assert_eq!(found, [("any", MatchKind::Any)]);
    }

    #[test]
    fn pattern_errors() {
        let mut idx: PathIndex<()> = PathIndex::new();
        for bad in [
            "", "api", "/a//b", "/a/../b", "/a/./b", "/%41", "/a%3a", "/a?b", "/a b",
        ] {
            for p in [exact(bad), prefix(bad), template(bad)] {
                assert!(
                    matches!(
                        idx.insert(p.clone(), ()),
                        Err(PatternError::NotNormalized { .. })
                    ),
                    "{p:?}"
                );
            }
        }
        assert_eq!(
            idx.insert(exact("/{id}"), ()),
            Err(PatternError::NotNormalized {
                pattern: "/{id}".to_owned()
            })
        );
        assert_eq!(
            idx.insert(template("/a/x{id}"), ()),
            Err(PatternError::ParamNotWholeSegment {
                segment: "x{id}".to_owned()
            })
        );
        assert_eq!(
            idx.insert(template("/a/{id}x"), ()),
            Err(PatternError::ParamNotWholeSegment {
                segment: "{id}x".to_owned()
            })
        );
        assert_eq!(
            idx.insert(template("/a/{{id}}"), ()),
            Err(PatternError::ParamNotWholeSegment {
                segment: "{{id}}".to_owned()
            })
        );
        assert_eq!(
            idx.insert(template("/a/{}"), ()),
            Err(PatternError::EmptyParamName {
                pattern: "/a/{}".to_owned()
            })
        );
        assert_eq!(
            idx.insert(template("/a/{a-b}"), ()),
            Err(PatternError::InvalidParamName {
                name: "a-b".to_owned()
            })
        );
        assert_eq!(
            idx.insert(template("/{id}/x/{id}"), ()),
            Err(PatternError::DuplicateParamName {
                name: "id".to_owned()
            })
        );
        assert_eq!(
            idx.insert(template("/a/{x}//b"), ()),
            Err(PatternError::NotNormalized {
                pattern: "/a/{x}//b".to_owned()
            })
        );
        assert!(idx.is_empty());
        // Encoded slashes are acceptable in patterns (inert unless allowed).
        assert_eq!(idx.insert(exact("/a%2Fb"), ()), Ok(()));
    }

    #[test]
    fn many_patterns_route_correctly() {
        let mut idx = PathIndex::new();
        for i in 0..300 {
            idx.insert(exact(&format!("/svc{i}/health")), i).unwrap();
            idx.insert(template(&format!("/svc{i}/items/{{id}}")), 1000 + i)
                .unwrap();
            idx.insert(prefix(&format!("/svc{i}/static")), 2000 + i)
                .unwrap();
        }
        let collect = |path: &str| {
            let mut v = Vec::new();
            idx.for_each_match(path, |x, _| v.push(*x));
            v.sort_unstable();
            v
        };
        assert_eq!(collect("/svc17/health"), [17]);
        assert_eq!(collect("/svc17/items/9"), [1017]);
        assert_eq!(collect("/svc17/static/css/a.css"), [2017]);
        assert!(collect("/svc17/staticx").is_empty());
        assert!(collect("/svc1700/health").is_empty());
    }
}

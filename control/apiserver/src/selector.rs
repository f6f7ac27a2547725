//! The `labelSelector` and `fieldSelector` query parameters of list and
//! watch, parsed, checked and applied as upstream does.
//!
//! Label selectors follow `k8s.io/apimachinery/pkg/labels`: the same lexer
//! (so `in`/`notin` may also be keys and values), the same requirement
//! validation of keys and values, and the same error messages, e.g.
//! `unable to parse requirement: found '' expected: '('`. A
//! `metav1.LabelSelector` JSON object converts as `LabelSelectorAsSelector`
//! does: `null` selects nothing, `{}` selects everything.
//!
//! Field selectors follow `k8s.io/apimachinery/pkg/fields`: comma-separated
//! `f=v`, `f==v` or `f!=v` terms whose values may escape `\,`, `\=` and `\\`.
//! Each field is then checked against the kind's field-label conversion
//! function (`pkg/apis/core/v1/conversion.go`); kinds without one accept
//! only `metadata.name` and `metadata.namespace`. Matching reads each field
//! from the stored JSON object the way the kind's `ToSelectableFields`
//! renders it from the internal object (missing strings are `""`, booleans
//! `true`/`false`, a pod's IP is its first `status.podIPs` entry).

use std::fmt;

use serde_json::{Map, Value};
use skiff_common::validation::{is_label_value, is_qualified_name};

use crate::status::ApiError;
use skiff_common::registry::ResourceInfo;

/// A selector that upstream refuses, with upstream's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// A malformed label selector or an invalid requirement in it.
    #[error("{message}")]
    Label {
        /// Upstream's message, e.g. `unable to parse requirement: …`.
        message: String,
    },
    /// A `matchExpressions` operator other than In, NotIn, Exists and
    /// DoesNotExist.
    #[error("{operator:?} is not a valid label selector operator")]
    Operator {
        /// The operator as given.
        operator: String,
    },
    /// A `metav1.LabelSelector` that is not shaped like one.
    #[error("invalid label selector: {reason}")]
    Malformed {
        /// What is wrong with it.
        reason: String,
    },
    /// A field selector term without `=`, `==` or `!=`.
    #[error("invalid selector: '{selector}'; can't understand '{term}'")]
    FieldSyntax {
        /// The whole selector.
        selector: String,
        /// The term that has no operator.
        term: String,
    },
    /// A backslash in a field selector value not followed by `\`, `,` or `=`.
    #[error("invalid field selector: invalid escape sequence: {sequence}")]
    InvalidEscape {
        /// The offending sequence, e.g. `\n`, or `\` at the end.
        sequence: String,
    },
    /// A bare `,` or `=` in a field selector value. Upstream prints the
    /// character as its code point number.
    #[error("invalid field selector: unescaped character in value: {}", u32::from(*character))]
    UnescapedCharacter {
        /// The character.
        character: char,
    },
    /// A field the kind's field-label conversion function refuses.
    #[error("field label not supported: {field}")]
    UnsupportedField {
        /// The field, e.g. `spec.foo`.
        field: String,
    },
    /// A field other than `metadata.name` and `metadata.namespace` for a kind
    /// that has no field-label conversion function.
    #[error(
        "{field:?} is not a known field selector: only \"metadata.name\", \"metadata.namespace\""
    )]
    UnknownField {
        /// The field, e.g. `spec.foo`.
        field: String,
    },
}

impl SelectorError {
    /// The 400 BadRequest the API server answers with.
    pub fn into_api_error(self) -> ApiError {
        ApiError::bad_request(self.to_string())
    }
}

impl From<SelectorError> for ApiError {
    fn from(err: SelectorError) -> Self {
        err.into_api_error()
    }
}

fn label_error(message: impl Into<String>) -> SelectorError {
    SelectorError::Label {
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------
// Label selectors
// ---------------------------------------------------------------------------

/// The operator of one label requirement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    /// `k=v`.
    Equals,
    /// `k==v`.
    DoubleEquals,
    /// `k!=v`: matches a different value or no such label.
    NotEquals,
    /// `k in (a,b)`.
    In,
    /// `k notin (a,b)`: matches other values or no such label.
    NotIn,
    /// `k`: the label is set.
    Exists,
    /// `!k`: the label is not set.
    DoesNotExist,
    /// `k>n`: the label is an integer greater than `n`.
    GreaterThan,
    /// `k<n`: the label is an integer less than `n`.
    LessThan,
}

/// One requirement of a label selector: a key, an operator and values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    key: String,
    operator: Operator,
    values: Vec<String>,
}

impl Requirement {
    /// A requirement checked as upstream's `NewRequirement` checks it.
    /// `path` prefixes field paths in errors (empty for query parameters).
    fn new(
        key: &str,
        operator: Operator,
        values: Vec<String>,
        path: &str,
    ) -> Result<Requirement, SelectorError> {
        let mut errs = Vec::new();
        let key_errs = is_qualified_name(key);
        if !key_errs.is_empty() {
            errs.push(field_invalid(
                &child(path, "key"),
                &GoValue::Str(key),
                &key_errs.join("; "),
            ));
        }
        let values_path = child(path, "values");
        let list = GoValue::List(&values);
        match operator {
            Operator::In | Operator::NotIn if values.is_empty() => errs.push(field_invalid(
                &values_path,
                &list,
                "for 'in', 'notin' operators, values set can't be empty",
            )),
            Operator::Equals | Operator::DoubleEquals | Operator::NotEquals
                if values.len() != 1 =>
            {
                errs.push(field_invalid(
                    &values_path,
                    &list,
                    "exact-match compatibility requires one single value",
                ))
            }
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                errs.push(field_invalid(
                    &values_path,
                    &list,
                    "values set must be empty for exists and does not exist",
                ))
            }
            Operator::GreaterThan | Operator::LessThan => {
                if values.len() != 1 {
                    errs.push(field_invalid(
                        &values_path,
                        &list,
                        "for 'Gt', 'Lt' operators, exactly one value is required",
                    ));
                }
                for (i, v) in values.iter().enumerate() {
                    if v.parse::<i64>().is_err() {
                        errs.push(field_invalid(
                            &format!("{values_path}[{i}]"),
                            &GoValue::Str(v),
                            "for 'Gt', 'Lt' operators, the value must be an integer",
                        ));
                    }
                }
            }
            _ => {}
        }
        for (i, v) in values.iter().enumerate() {
            let value_errs = is_label_value(v);
            if !value_errs.is_empty() {
                errs.push(field_invalid(
                    &format!("{values_path}[{i}][{key}]"),
                    &GoValue::Str(v),
                    &value_errs.join("; "),
                ));
            }
        }
        if let Some(message) = aggregate(errs) {
            return Err(label_error(message));
        }
        Ok(Requirement {
            key: key.to_string(),
            operator,
            values,
        })
    }

    /// The label key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The operator.
    pub fn operator(&self) -> Operator {
        self.operator
    }

    /// The values, as given (sorted and deduplicated when parsed from a
    /// string, as upstream does).
    pub fn values(&self) -> &[String] {
        &self.values
    }

    /// Whether `labels` satisfy this requirement.
    pub fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        let value = labels
            .and_then(|l| l.get(&self.key))
            .and_then(Value::as_str);
        let has = |v: &str| self.values.iter().any(|x| x == v);
        match self.operator {
            Operator::In | Operator::Equals | Operator::DoubleEquals => value.is_some_and(has),
            Operator::NotIn | Operator::NotEquals => !value.is_some_and(has),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
            Operator::GreaterThan | Operator::LessThan => {
                let Some(actual) = value.and_then(|v| v.parse::<i64>().ok()) else {
                    return false;
                };
                let [wanted] = self.values.as_slice() else {
                    return false;
                };
                let Ok(wanted) = wanted.parse::<i64>() else {
                    return false;
                };
                if self.operator == Operator::GreaterThan {
                    actual > wanted
                } else {
                    actual < wanted
                }
            }
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.operator == Operator::DoesNotExist {
            f.write_str("!")?;
        }
        f.write_str(&self.key)?;
        let op = match self.operator {
            Operator::Equals => "=",
            Operator::DoubleEquals => "==",
            Operator::NotEquals => "!=",
            Operator::In => " in ",
            Operator::NotIn => " notin ",
            Operator::GreaterThan => ">",
            Operator::LessThan => "<",
            Operator::Exists | Operator::DoesNotExist => return Ok(()),
        };
        f.write_str(op)?;
        let set = matches!(self.operator, Operator::In | Operator::NotIn);
        if set {
            f.write_str("(")?;
        }
        let mut values: Vec<&str> = self.values.iter().map(String::as_str).collect();
        values.sort_unstable();
        f.write_str(&values.join(","))?;
        if set {
            f.write_str(")")?;
        }
        Ok(())
    }
}

/// A parsed label selector: `a=b`, `a==b`, `a!=b`, `a in (x,y)`,
/// `a notin (x)`, `a`, `!a`, `a>1`, `a<1`, comma-separated (AND). Empty
/// selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
    /// Selects nothing at all (a `null` `metav1.LabelSelector`).
    nothing: bool,
}

impl LabelSelector {
    /// The selector that matches every object.
    pub fn everything() -> LabelSelector {
        LabelSelector::default()
    }

    /// The selector that matches no object.
    pub fn nothing() -> LabelSelector {
        LabelSelector {
            requirements: Vec::new(),
            nothing: true,
        }
    }

    /// Parse the string form, as the `labelSelector` query parameter holds.
    pub fn parse(s: &str) -> Result<LabelSelector, SelectorError> {
        let tokens = lex(s);
        let mut parser = Parser { tokens, pos: 0 };
        let mut requirements = parser.parse()?;
        requirements.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(LabelSelector {
            requirements,
            nothing: false,
        })
    }

    /// From a `metav1.LabelSelector` JSON object (`matchLabels` and
    /// `matchExpressions` with In, NotIn, Exists, DoesNotExist), as
    /// upstream's `LabelSelectorAsSelector` converts it: `null` selects
    /// nothing, an empty selector everything.
    pub fn from_json(selector: &Value) -> Result<LabelSelector, SelectorError> {
        let obj = match selector {
            Value::Null => return Ok(LabelSelector::nothing()),
            Value::Object(obj) => obj,
            other => {
                return Err(SelectorError::Malformed {
                    reason: format!("expected an object, got {other}"),
                });
            }
        };
        let mut requirements = Vec::new();
        match obj.get("matchLabels") {
            None | Some(Value::Null) => {}
            Some(Value::Object(labels)) => {
                for (k, v) in labels {
                    let v = v.as_str().ok_or_else(|| SelectorError::Malformed {
                        reason: format!("matchLabels[{k}] must be a string"),
                    })?;
                    requirements.push(Requirement::new(
                        k,
                        Operator::Equals,
                        vec![v.to_string()],
                        "",
                    )?);
                }
            }
            Some(_) => {
                return Err(SelectorError::Malformed {
                    reason: "matchLabels must be an object".to_string(),
                });
            }
        }
        match obj.get("matchExpressions") {
            None | Some(Value::Null) => {}
            Some(Value::Array(exprs)) => {
                for (i, expr) in exprs.iter().enumerate() {
                    requirements.push(expression(i, expr)?);
                }
            }
            Some(_) => {
                return Err(SelectorError::Malformed {
                    reason: "matchExpressions must be an array".to_string(),
                });
            }
        }
        requirements.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(LabelSelector {
            requirements,
            nothing: false,
        })
    }

    /// Whether this selector selects everything (no requirements).
    pub fn is_empty(&self) -> bool {
        !self.nothing && self.requirements.is_empty()
    }

    /// Whether this selector selects nothing at all.
    pub fn is_nothing(&self) -> bool {
        self.nothing
    }

    /// The requirements, sorted by key.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// Whether an object with these labels (`None` for no labels) is
    /// selected.
    pub fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        !self.nothing && self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether `obj` is selected by its `metadata.labels`.
    pub fn matches_object(&self, obj: &Value) -> bool {
        self.matches(obj.pointer("/metadata/labels").and_then(Value::as_object))
    }

    /// When the selector requires `label` to have one value (`=`, `==` or a
    /// one-value `in`), that value.
    pub fn exact_match(&self, label: &str) -> Option<&str> {
        let r = self.requirements.iter().find(|r| r.key == label)?;
        match (r.operator, r.values.as_slice()) {
            (Operator::Equals | Operator::DoubleEquals | Operator::In, [v]) => Some(v),
            _ => None,
        }
    }
}

impl fmt::Display for LabelSelector {
    /// Upstream's `String()`: requirements joined by `,`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// One `matchExpressions` entry as a requirement.
fn expression(index: usize, expr: &Value) -> Result<Requirement, SelectorError> {
    let malformed = |what: &str| SelectorError::Malformed {
        reason: format!("matchExpressions[{index}].{what}"),
    };
    let key = match expr.get("key") {
        None | Some(Value::Null) => "",
        Some(Value::String(k)) => k,
        Some(_) => return Err(malformed("key must be a string")),
    };
    let operator = match expr.get("operator") {
        None | Some(Value::Null) => "",
        Some(Value::String(op)) => op,
        Some(_) => return Err(malformed("operator must be a string")),
    };
    let values = match expr.get("values") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(vs)) => vs
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| malformed("values must be strings"))?,
        Some(_) => return Err(malformed("values must be an array")),
    };
    let op = match operator {
        "In" => Operator::In,
        "NotIn" => Operator::NotIn,
        "Exists" => Operator::Exists,
        "DoesNotExist" => Operator::DoesNotExist,
        other => {
            return Err(SelectorError::Operator {
                operator: other.to_string(),
            });
        }
    };
    Requirement::new(key, op, values, "")
}

// --- lexer ------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Error,
    End,
    ClosedPar,
    Comma,
    DoesNotExist,
    DoubleEquals,
    Equals,
    GreaterThan,
    Identifier,
    In,
    LessThan,
    NotEquals,
    NotIn,
    OpenPar,
}

fn keyword(s: &str) -> Option<Token> {
    Some(match s {
        ")" => Token::ClosedPar,
        "," => Token::Comma,
        "!" => Token::DoesNotExist,
        "==" => Token::DoubleEquals,
        "=" => Token::Equals,
        ">" => Token::GreaterThan,
        "in" => Token::In,
        "<" => Token::LessThan,
        "!=" => Token::NotEquals,
        "notin" => Token::NotIn,
        "(" => Token::OpenPar,
        _ => return None,
    })
}

fn is_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn is_special(b: u8) -> bool {
    matches!(b, b'=' | b'!' | b'(' | b')' | b',' | b'>' | b'<')
}

/// Split a selector into tokens, ending with [`Token::End`].
fn lex(s: &str) -> Vec<(Token, String)> {
    let bytes = s.as_bytes();
    let mut pos = 0;
    let mut out = Vec::new();
    loop {
        while pos < bytes.len() && is_whitespace(bytes[pos]) {
            pos += 1;
        }
        if pos >= bytes.len() {
            out.push((Token::End, String::new()));
            return out;
        }
        let start = pos;
        if is_special(bytes[pos]) {
            // The longest run of special characters that still spells an
            // operator: `!=` and `==` win over `!` and `=`.
            let mut last: Option<(Token, usize)> = None;
            while pos < bytes.len() && is_special(bytes[pos]) {
                match keyword(&s[start..=pos]) {
                    Some(tok) => last = Some((tok, pos + 1)),
                    None if last.is_some() => break,
                    None => {}
                }
                pos += 1;
            }
            match last {
                Some((tok, end)) => {
                    pos = end;
                    out.push((tok, s[start..end].to_string()));
                }
                None => out.push((
                    Token::Error,
                    format!("error expected: keyword found '{}'", &s[start..pos]),
                )),
            }
        } else {
            while pos < bytes.len() && !is_special(bytes[pos]) && !is_whitespace(bytes[pos]) {
                pos += 1;
            }
            let word = &s[start..pos];
            let tok = keyword(word).unwrap_or(Token::Identifier);
            out.push((tok, word.to_string()));
        }
    }
}

// --- parser -------------------------------------------------------------------

/// Whether `in` and `notin` count as keywords or as plain identifiers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Context {
    KeyAndOperator,
    Values,
}

struct Parser {
    tokens: Vec<(Token, String)>,
    pos: usize,
}

impl Parser {
    fn token(&self, at: usize, ctx: Context) -> (Token, String) {
        // The lexer always ends with `End`; stay there once reached.
        let (tok, lit) = self.tokens[at.min(self.tokens.len() - 1)].clone();
        let tok = match tok {
            Token::In | Token::NotIn if ctx == Context::Values => Token::Identifier,
            t => t,
        };
        (tok, lit)
    }

    fn lookahead(&self, ctx: Context) -> (Token, String) {
        self.token(self.pos, ctx)
    }

    fn consume(&mut self, ctx: Context) -> (Token, String) {
        let t = self.token(self.pos, ctx);
        self.pos += 1;
        t
    }

    fn parse(&mut self) -> Result<Vec<Requirement>, SelectorError> {
        let mut requirements = Vec::new();
        loop {
            let (tok, lit) = self.lookahead(Context::Values);
            match tok {
                Token::Identifier | Token::DoesNotExist => {
                    let r = self
                        .requirement()
                        .map_err(|e| label_error(format!("unable to parse requirement: {e}")))?;
                    requirements.push(r);
                    let (t, l) = self.consume(Context::Values);
                    match t {
                        Token::End => return Ok(requirements),
                        Token::Comma => {
                            let (t2, l2) = self.lookahead(Context::Values);
                            if t2 != Token::Identifier && t2 != Token::DoesNotExist {
                                return Err(label_error(format!(
                                    "found '{l2}', expected: identifier after ','"
                                )));
                            }
                        }
                        _ => {
                            return Err(label_error(format!(
                                "found '{l}', expected: ',' or 'end of string'"
                            )));
                        }
                    }
                }
                Token::End => return Ok(requirements),
                _ => {
                    return Err(label_error(format!(
                        "found '{lit}', expected: !, identifier, or 'end of string'"
                    )));
                }
            }
        }
    }

    fn requirement(&mut self) -> Result<Requirement, SelectorError> {
        let (key, unary) = self.key_and_inferred_operator()?;
        if let Some(op) = unary {
            return Requirement::new(&key, op, Vec::new(), "");
        }
        let op = self.operator()?;
        let mut values = match op {
            Operator::In | Operator::NotIn => self.values()?,
            _ => self.exact_value()?,
        };
        // Upstream collects values in a set and lists them sorted.
        values.sort();
        values.dedup();
        Requirement::new(&key, op, values, "")
    }

    /// The key, and `Exists`/`DoesNotExist` when no binary operator follows.
    fn key_and_inferred_operator(&mut self) -> Result<(String, Option<Operator>), SelectorError> {
        let (mut tok, mut lit) = self.consume(Context::Values);
        let mut op = None;
        if tok == Token::DoesNotExist {
            op = Some(Operator::DoesNotExist);
            (tok, lit) = self.consume(Context::Values);
        }
        if tok != Token::Identifier {
            return Err(label_error(format!("found '{lit}', expected: identifier")));
        }
        let errs = is_qualified_name(&lit);
        if !errs.is_empty() {
            // Upstream's parser has no field path: it prints as `<nil>`.
            return Err(label_error(field_invalid(
                "<nil>",
                &GoValue::Str(&lit),
                &errs.join("; "),
            )));
        }
        let (next, _) = self.lookahead(Context::Values);
        if matches!(next, Token::End | Token::Comma) && op.is_none() {
            op = Some(Operator::Exists);
        }
        Ok((lit, op))
    }

    fn operator(&mut self) -> Result<Operator, SelectorError> {
        let (tok, lit) = self.consume(Context::KeyAndOperator);
        Ok(match tok {
            Token::In => Operator::In,
            Token::Equals => Operator::Equals,
            Token::DoubleEquals => Operator::DoubleEquals,
            Token::GreaterThan => Operator::GreaterThan,
            Token::LessThan => Operator::LessThan,
            Token::NotIn => Operator::NotIn,
            Token::NotEquals => Operator::NotEquals,
            _ => {
                return Err(label_error(format!(
                    "found '{lit}', expected: in, notin, =, ==, !=, gt, lt"
                )));
            }
        })
    }

    /// `( a, b, … )`; empty entries are the empty value.
    fn values(&mut self) -> Result<Vec<String>, SelectorError> {
        let (tok, lit) = self.consume(Context::Values);
        if tok != Token::OpenPar {
            return Err(label_error(format!("found '{lit}' expected: '('")));
        }
        let (tok, lit) = self.lookahead(Context::Values);
        match tok {
            Token::Identifier | Token::Comma => {
                let values = self.identifiers()?;
                let (tok, _) = self.consume(Context::Values);
                if tok != Token::ClosedPar {
                    return Err(label_error(format!("found '{lit}', expected: ')'")));
                }
                Ok(values)
            }
            Token::ClosedPar => {
                self.consume(Context::Values);
                Ok(vec![String::new()])
            }
            _ => Err(label_error(format!(
                "found '{lit}', expected: ',', ')' or identifier"
            ))),
        }
    }

    fn identifiers(&mut self) -> Result<Vec<String>, SelectorError> {
        let mut values: Vec<String> = Vec::new();
        loop {
            let (tok, lit) = self.consume(Context::Values);
            match tok {
                Token::Identifier => {
                    values.push(lit);
                    let (tok2, lit2) = self.lookahead(Context::Values);
                    match tok2 {
                        Token::Comma => continue,
                        Token::ClosedPar => return Ok(values),
                        _ => {
                            return Err(label_error(format!(
                                "found '{lit2}', expected: ',' or ')'"
                            )));
                        }
                    }
                }
                Token::Comma => {
                    if values.is_empty() {
                        values.push(String::new());
                    }
                    let (tok2, _) = self.lookahead(Context::Values);
                    if tok2 == Token::ClosedPar {
                        values.push(String::new());
                        return Ok(values);
                    }
                    if tok2 == Token::Comma {
                        values.push(String::new());
                    }
                }
                _ => {
                    return Err(label_error(format!(
                        "found '{lit}', expected: ',', or identifier"
                    )));
                }
            }
        }
    }

    fn exact_value(&mut self) -> Result<Vec<String>, SelectorError> {
        let (tok, _) = self.lookahead(Context::Values);
        if matches!(tok, Token::End | Token::Comma) {
            return Ok(vec![String::new()]);
        }
        let (tok, lit) = self.consume(Context::Values);
        if tok == Token::Identifier {
            Ok(vec![lit])
        } else {
            Err(label_error(format!("found '{lit}', expected: identifier")))
        }
    }
}

/// A bad value as Go's `field.Invalid` prints it.
enum GoValue<'a> {
    /// `%q`.
    Str(&'a str),
    /// `%#v` of a `[]string`; `[]string(nil)` when empty, as a nil slice.
    List(&'a [String]),
}

fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `<path>: Invalid value: <value>: <detail>`, as `field.Error` renders.
fn field_invalid(path: &str, value: &GoValue<'_>, detail: &str) -> String {
    let value = match value {
        GoValue::Str(s) => go_quote(s),
        GoValue::List([]) => "[]string(nil)".to_string(),
        GoValue::List(vs) => format!(
            "[]string{{{}}}",
            vs.iter()
                .map(|v| go_quote(v))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    format!("{path}: Invalid value: {value}: {detail}")
}

fn child(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

/// An error list as upstream aggregates it: one message alone, several
/// (deduplicated) as `[a, b]`.
fn aggregate(mut errs: Vec<String>) -> Option<String> {
    let mut seen = std::collections::HashSet::new();
    errs.retain(|e| seen.insert(e.clone()));
    match errs.len() {
        0 => None,
        1 => errs.pop(),
        _ => Some(format!("[{}]", errs.join(", "))),
    }
}

// ---------------------------------------------------------------------------
// Field selectors
// ---------------------------------------------------------------------------

/// Which upstream field set a kind selects on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FieldKind {
    Pod,
    Node,
    Event,
    Namespace,
    Secret,
    Service,
    /// Kinds with no field-label conversion: `metadata.name` and
    /// `metadata.namespace` only.
    Default,
}

impl FieldKind {
    fn of(info: &ResourceInfo) -> FieldKind {
        if !info.group.is_empty() {
            return FieldKind::Default;
        }
        match info.kind {
            "Pod" => FieldKind::Pod,
            "Node" => FieldKind::Node,
            "Event" => FieldKind::Event,
            "Namespace" => FieldKind::Namespace,
            "Secret" => FieldKind::Secret,
            "Service" => FieldKind::Service,
            _ => FieldKind::Default,
        }
    }

    /// The fields the kind's field-label conversion accepts.
    fn accepted(self) -> &'static [&'static str] {
        match self {
            FieldKind::Pod => &[
                "metadata.name",
                "metadata.namespace",
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.podIPs",
                "status.nominatedNodeName",
            ],
            FieldKind::Node => &["metadata.name", "spec.unschedulable"],
            FieldKind::Event => &[
                "involvedObject.kind",
                "involvedObject.namespace",
                "involvedObject.name",
                "involvedObject.uid",
                "involvedObject.apiVersion",
                "involvedObject.resourceVersion",
                "involvedObject.fieldPath",
                "reason",
                "reportingComponent",
                "source",
                "type",
                "metadata.namespace",
                "metadata.name",
            ],
            FieldKind::Namespace => &["status.phase", "metadata.name"],
            FieldKind::Secret => &["type", "metadata.namespace", "metadata.name"],
            FieldKind::Service => &[
                "metadata.namespace",
                "metadata.name",
                "spec.clusterIP",
                "spec.type",
            ],
            FieldKind::Default => &["metadata.name", "metadata.namespace"],
        }
    }

    /// The kind's field-label conversion: the field to select on, or why
    /// not.
    fn convert(self, field: &str) -> Result<&'static str, SelectorError> {
        let accepted = self.accepted();
        if self == FieldKind::Default {
            return accepted
                .iter()
                .find(|f| **f == field)
                .copied()
                .ok_or_else(|| SelectorError::UnknownField {
                    field: field.to_string(),
                });
        }
        if self == FieldKind::Pod && field == "spec.host" {
            // Old v1 clients' name for spec.nodeName.
            return Ok("spec.nodeName");
        }
        accepted
            .iter()
            .find(|f| **f == field)
            .copied()
            .ok_or_else(|| SelectorError::UnsupportedField {
                field: field.to_string(),
            })
    }

    /// The value upstream's `ToSelectableFields` gives `field` for `obj`.
    fn value(self, obj: &Value, field: &str) -> String {
        let s = |ptr: &str| {
            obj.pointer(ptr)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let flag = |ptr: &str| {
            obj.pointer(ptr)
                .and_then(Value::as_bool)
                .unwrap_or(false)
                .to_string()
        };
        match (self, field) {
            (_, "metadata.name") => s("/metadata/name"),
            (FieldKind::Node | FieldKind::Namespace, "metadata.namespace") => String::new(),
            (_, "metadata.namespace") => s("/metadata/namespace"),
            (FieldKind::Pod, "spec.nodeName") => s("/spec/nodeName"),
            (FieldKind::Pod, "spec.restartPolicy") => s("/spec/restartPolicy"),
            (FieldKind::Pod, "spec.schedulerName") => s("/spec/schedulerName"),
            (FieldKind::Pod, "spec.serviceAccountName") => {
                // The deprecated `serviceAccount` stands in when the new
                // field is unset, as the v1 conversion does.
                let name = s("/spec/serviceAccountName");
                if name.is_empty() {
                    s("/spec/serviceAccount")
                } else {
                    name
                }
            }
            (FieldKind::Pod, "spec.hostNetwork") => flag("/spec/hostNetwork"),
            (FieldKind::Pod, "status.phase") => s("/status/phase"),
            (FieldKind::Pod, "status.podIP") => {
                let first = s("/status/podIPs/0/ip");
                if first.is_empty() {
                    s("/status/podIP")
                } else {
                    first
                }
            }
            (FieldKind::Pod, "status.nominatedNodeName") => s("/status/nominatedNodeName"),
            (FieldKind::Node, "spec.unschedulable") => flag("/spec/unschedulable"),
            (FieldKind::Namespace, "status.phase") => s("/status/phase"),
            (FieldKind::Secret, "type") => s("/type"),
            (FieldKind::Service, "spec.clusterIP") => s("/spec/clusterIP"),
            (FieldKind::Service, "spec.type") => s("/spec/type"),
            (FieldKind::Event, "source") => s("/source/component"),
            (FieldKind::Event, "reason") => s("/reason"),
            (FieldKind::Event, "type") => s("/type"),
            (FieldKind::Event, "reportingComponent") => s("/reportingComponent"),
            (FieldKind::Event, f) => match f.strip_prefix("involvedObject.") {
                Some(sub) => s(&format!("/involvedObject/{sub}")),
                None => String::new(),
            },
            // Accepted by the conversion but not in the field set (e.g. a
            // pod's `status.podIPs`): upstream reads it as empty.
            _ => String::new(),
        }
    }
}

/// What selectors read of an object, by top-level field: the fields kept
/// of it, or `None` for all of it. It covers every JSON pointer
/// [`FieldKind::value`] reads, and `metadata.labels`.
const SELECTABLE: &[(&str, Option<&[&str]>)] = &[
    ("metadata", Some(&["name", "namespace", "labels"])),
    (
        "spec",
        Some(&[
            "nodeName",
            "restartPolicy",
            "schedulerName",
            "serviceAccountName",
            "serviceAccount",
            "hostNetwork",
            "unschedulable",
            "clusterIP",
            "type",
        ]),
    ),
    (
        "status",
        Some(&["phase", "podIP", "podIPs", "nominatedNodeName"]),
    ),
    ("type", None),
    ("reason", None),
    ("reportingComponent", None),
    ("source", None),
    ("involvedObject", None),
];

/// The part of the JSON object `text` that label and field selectors read,
/// decoded: label and field selectors select it exactly when they select
/// the whole object. Decoding only that much is what lets a watch with
/// selectors skip decoding the rest of every object that changes.
pub fn selectable(text: &[u8]) -> Result<Value, serde_json::Error> {
    let mut object = Map::new();
    for (key, raw) in crate::rawjson::Fields::parse(text)?.0 {
        let Some((_, keep)) = SELECTABLE.iter().find(|(name, _)| *name == key) else {
            continue;
        };
        let value = match keep {
            Some(keep) if raw.get().starts_with('{') => {
                let mut kept = Map::new();
                for (field, raw) in crate::rawjson::Fields::of(raw)?.0 {
                    if keep.contains(&field.as_ref()) {
                        kept.insert(field.into_owned(), serde_json::from_str(raw.get())?);
                    }
                }
                Value::Object(kept)
            }
            _ => serde_json::from_str(raw.get())?,
        };
        object.insert(key.into_owned(), value);
    }
    Ok(Value::Object(object))
}

/// One `field=value` or `field!=value` term.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldTerm {
    field: String,
    value: String,
    negated: bool,
}

/// A parsed field selector: `f=v`, `f==v`, `f!=v`, comma-separated (AND);
/// values may contain escaped `\,` `\=` `\\` as upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldSelector {
    kind: FieldKind,
    terms: Vec<FieldTerm>,
}

impl FieldSelector {
    /// The selector that matches every object.
    pub fn everything() -> FieldSelector {
        FieldSelector {
            kind: FieldKind::Default,
            terms: Vec::new(),
        }
    }

    /// Parse and check every field is supported for kind `info`, as
    /// upstream's per-kind field-label conversion functions do.
    pub fn parse(info: &ResourceInfo, s: &str) -> Result<FieldSelector, SelectorError> {
        let kind = FieldKind::of(info);
        let mut parts = split_terms(s);
        parts.sort_unstable();
        let mut terms = Vec::new();
        for part in parts.into_iter().filter(|p| !p.is_empty()) {
            let (field, negated, raw) =
                split_term(part).ok_or_else(|| SelectorError::FieldSyntax {
                    selector: s.to_string(),
                    term: part.to_string(),
                })?;
            terms.push(FieldTerm {
                field: field.to_string(),
                value: unescape(raw)?,
                negated,
            });
        }
        // Upstream transforms the parsed selector term by term afterwards.
        for term in &mut terms {
            term.field = kind.convert(&term.field)?.to_string();
        }
        Ok(FieldSelector { kind, terms })
    }

    /// Whether `obj` is selected.
    pub fn matches(&self, obj: &Value) -> bool {
        self.terms
            .iter()
            .all(|t| (self.kind.value(obj, &t.field) == t.value) != t.negated)
    }

    /// Whether this selector selects everything (no terms).
    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// When the selector requires `field` to equal one value, that value.
    pub fn exact_match(&self, field: &str) -> Option<&str> {
        self.terms
            .iter()
            .find(|t| !t.negated && t.field == field)
            .map(|t| t.value.as_str())
    }

    /// When the selector pins `metadata.name=X` (as `kubectl get -w NAME` and
    /// `kubectl delete --wait` send), X — lets the server narrow an etcd
    /// read to one key.
    pub fn exact_name(&self) -> Option<&str> {
        self.exact_match("metadata.name")
    }
}

impl Default for FieldSelector {
    fn default() -> Self {
        FieldSelector::everything()
    }
}

impl fmt::Display for FieldSelector {
    /// Upstream's `String()`, with values escaped again.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.terms.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let op = if t.negated { "!=" } else { "=" };
            write!(f, "{}{op}{}", t.field, escape(&t.value))?;
        }
        Ok(())
    }
}

/// Escape `\`, `,` and `=` in a field selector value.
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '\\' | ',' | '=') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The terms of a field selector, split at commas not escaped by `\`.
fn split_terms(s: &str) -> Vec<&str> {
    if s.is_empty() {
        return Vec::new();
    }
    let mut terms = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == ',' {
            terms.push(&s[start..i]);
            start = i + 1;
        }
    }
    terms.push(&s[start..]);
    terms
}

/// `(field, negated, raw value)` split at the first operator.
fn split_term(term: &str) -> Option<(&str, bool, &str)> {
    for (i, _) in term.char_indices() {
        let rest = &term[i..];
        for (op, negated) in [("!=", true), ("==", false), ("=", false)] {
            if let Some(value) = rest.strip_prefix(op) {
                return Some((&term[..i], negated, value));
            }
        }
    }
    None
}

/// Undo [`escape`]; a bare `,` or `=` or an unknown escape is an error.
fn unescape(raw: &str) -> Result<String, SelectorError> {
    let mut out = String::with_capacity(raw.len());
    let mut escaped = false;
    for c in raw.chars() {
        if escaped {
            if !matches!(c, '\\' | ',' | '=') {
                return Err(SelectorError::InvalidEscape {
                    sequence: format!("\\{c}"),
                });
            }
            out.push(c);
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            ',' | '=' => return Err(SelectorError::UnescapedCharacter { character: c }),
            c => out.push(c),
        }
    }
    if escaped {
        return Err(SelectorError::InvalidEscape {
            sequence: "\\".to_string(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use skiff_common::registry;

    fn labels(v: Value) -> Map<String, Value> {
        v.as_object().expect("labels are an object").clone()
    }

    fn parse(s: &str) -> LabelSelector {
        LabelSelector::parse(s).unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    fn parse_err(s: &str) -> String {
        match LabelSelector::parse(s) {
            Ok(sel) => panic!("{s:?} should not parse, got {sel:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn info(plural: &str) -> &'static ResourceInfo {
        registry::RESOURCES
            .iter()
            .find(|r| r.plural == plural)
            .unwrap_or_else(|| panic!("{plural} is served"))
    }

    fn fields(plural: &str, s: &str) -> FieldSelector {
        FieldSelector::parse(info(plural), s)
            .unwrap_or_else(|e| panic!("{s:?} should parse for {plural}: {e}"))
    }

    fn fields_err(plural: &str, s: &str) -> String {
        match FieldSelector::parse(info(plural), s) {
            Ok(sel) => panic!("{s:?} should not parse for {plural}, got {sel:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn every_label_operator_matches_as_upstream() {
        let l = labels(json!({"app": "web", "tier": "front", "n": "5", "empty": ""}));
        let cases: &[(&str, bool)] = &[
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app=db", false),
            ("app!=db", true),
            ("app!=web", false),
            ("missing!=x", true),
            ("app in (web,db)", true),
            ("app in (db)", false),
            ("missing in (x)", false),
            ("app notin (db)", true),
            ("app notin (web)", false),
            ("missing notin (x)", true),
            ("app", true),
            ("missing", false),
            ("!missing", true),
            ("!app", false),
            ("n>4", true),
            ("n>5", false),
            ("n<6", true),
            ("app>1", false),
            ("missing<1", false),
            ("empty=", true),
            ("empty in ()", true),
            ("app=web,tier=front", true),
            ("app=web,tier=back", false),
            ("app in (web),!missing,tier", true),
        ];
        for (sel, want) in cases {
            assert_eq!(parse(sel).matches(Some(&l)), *want, "selector {sel:?}");
        }
        assert!(parse("").is_empty());
        assert!(!parse("app").is_empty());
        assert!(parse("!app").matches(None), "no labels at all");
        assert!(!parse("app").matches(None));
    }

    #[test]
    fn whitespace_is_tolerated_and_keywords_may_be_values() {
        let l = labels(json!({"app": "web", "in": "notin"}));
        for sel in [
            "  app = web ",
            "app\t==\tweb",
            "app in(web , db)",
            " app  in  ( db,web ) , ! missing ",
            "in in (notin)",
            "in=notin",
            "app notin(x),\nin",
        ] {
            assert!(parse(sel).matches(Some(&l)), "selector {sel:?}");
        }
        assert_eq!(parse("x in (b,a,a) , !y,z").to_string(), "x in (a,b),!y,z");
        assert_eq!(parse("b=1,a!=2").to_string(), "a!=2,b=1");
    }

    #[test]
    fn label_parse_errors_carry_upstream_messages() {
        let cases: &[(&str, &str)] = &[
            (
                "a in",
                "unable to parse requirement: found '' expected: '('",
            ),
            (
                "=b",
                "found '=', expected: !, identifier, or 'end of string'",
            ),
            ("a,", "found '', expected: identifier after ','"),
            (
                "a b",
                "unable to parse requirement: found 'b', expected: in, notin, =, ==, !=, gt, lt",
            ),
            ("a=b c", "found 'c', expected: ',' or 'end of string'"),
            (
                "a in (b c)",
                "unable to parse requirement: found 'c', expected: ',' or ')'",
            ),
            (
                "a in b",
                "unable to parse requirement: found 'b' expected: '('",
            ),
            (
                "a=(",
                "unable to parse requirement: found '(', expected: identifier",
            ),
            (
                "!=b",
                "found '!=', expected: !, identifier, or 'end of string'",
            ),
            (
                "! =b",
                "unable to parse requirement: found '=', expected: identifier",
            ),
            ("!a=b", "found '=', expected: ',' or 'end of string'"),
            (
                "a>b",
                "unable to parse requirement: values[0]: Invalid value: \"b\": for 'Gt', 'Lt' operators, the value must be an integer",
            ),
        ];
        for (sel, want) in cases {
            assert_eq!(parse_err(sel), *want, "selector {sel:?}");
        }
    }

    #[test]
    fn bad_label_keys_and_values_are_refused() {
        let regex = "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
        assert_eq!(
            parse_err("-app=web"),
            format!(
                "unable to parse requirement: <nil>: Invalid value: \"-app\": name part {regex}"
            )
        );
        assert_eq!(
            parse_err("/app"),
            "unable to parse requirement: <nil>: Invalid value: \"/app\": prefix part must be non-empty"
        );
        assert!(
            parse_err("Example.com/app").contains("prefix part a lowercase RFC 1123 subdomain"),
            "uppercase prefix"
        );
        assert!(parse_err("a/b/c").contains("a valid label key must consist"));
        assert!(parse_err(&"k".repeat(64)).contains("name part must be no more than 63 bytes"));
        let value = parse_err("app=-web");
        assert!(
            value.starts_with("unable to parse requirement: values[0][app]: Invalid value: \"-web\": a valid label must be an empty string"),
            "{value}"
        );
        assert!(
            parse("example.com/app-1_x.y=V.1")
                .matches(Some(&labels(json!({"example.com/app-1_x.y": "V.1"}))))
        );
    }

    #[test]
    fn from_json_converts_match_labels_and_expressions() {
        let sel = LabelSelector::from_json(&json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["front", "edge"]},
                {"key": "env", "operator": "NotIn", "values": ["prod"]},
                {"key": "team", "operator": "Exists"},
                {"key": "legacy", "operator": "DoesNotExist", "values": []},
            ],
        }))
        .expect("valid selector");
        assert_eq!(
            sel.to_string(),
            "app=web,env notin (prod),!legacy,team,tier in (edge,front)"
        );
        let ok = labels(json!({"app": "web", "tier": "edge", "team": "a"}));
        assert!(sel.matches(Some(&ok)));
        let cases = [
            json!({"app": "web", "tier": "back", "team": "a"}),
            json!({"app": "web", "tier": "edge", "team": "a", "env": "prod"}),
            json!({"app": "web", "tier": "edge"}),
            json!({"app": "web", "tier": "edge", "team": "a", "legacy": "1"}),
            json!({"app": "db", "tier": "edge", "team": "a"}),
        ];
        for l in cases {
            assert!(!sel.matches(Some(&labels(l.clone()))), "{l}");
        }

        let everything = LabelSelector::from_json(&json!({})).expect("empty selector");
        assert!(everything.is_empty() && everything.matches(None));
        let nothing = LabelSelector::from_json(&Value::Null).expect("null selector");
        assert!(!nothing.is_empty() && nothing.is_nothing());
        assert!(!nothing.matches(Some(&ok)));
    }

    #[test]
    fn from_json_refuses_what_upstream_refuses() {
        let err = |v: Value| {
            LabelSelector::from_json(&v)
                .expect_err("selector should be refused")
                .to_string()
        };
        assert_eq!(
            err(json!({"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]})),
            "\"Gt\" is not a valid label selector operator"
        );
        assert_eq!(
            err(json!({"matchExpressions": [{"key": "a", "operator": "In", "values": []}]})),
            "values: Invalid value: []string(nil): for 'in', 'notin' operators, values set can't be empty"
        );
        assert_eq!(
            err(
                json!({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x", "y"]}]})
            ),
            "values: Invalid value: []string{\"x\", \"y\"}: values set must be empty for exists and does not exist"
        );
        assert!(
            err(json!({"matchLabels": {"a b": "c"}}))
                .starts_with("key: Invalid value: \"a b\": name part")
        );
        assert!(
            err(json!({"matchLabels": {"a": "b c"}}))
                .starts_with("values[0][a]: Invalid value: \"b c\"")
        );
        assert!(err(json!([])).starts_with("invalid label selector"));
        let api = LabelSelector::parse("a in")
            .expect_err("bad selector")
            .into_api_error();
        assert_eq!((api.code, api.reason), (400, "BadRequest"));
    }

    #[test]
    fn label_exact_match() {
        assert_eq!(parse("a=1,b in (2)").exact_match("b"), Some("2"));
        assert_eq!(parse("a=1").exact_match("a"), Some("1"));
        assert_eq!(parse("a!=1").exact_match("a"), None);
        assert_eq!(parse("a in (1,2)").exact_match("a"), None);
        assert_eq!(parse("a=1").exact_match("b"), None);
    }

    #[test]
    fn pod_fields_select_as_upstream() {
        let pod = json!({
            "metadata": {"name": "web-1", "namespace": "default"},
            "spec": {"nodeName": "node-a", "restartPolicy": "Always", "schedulerName": "default-scheduler",
                     "serviceAccount": "builder", "hostNetwork": true},
            "status": {"phase": "Running", "podIP": "10.0.0.9", "podIPs": [{"ip": "10.0.0.9"}, {"ip": "fd00::9"}]},
        });
        let cases: &[(&str, bool)] = &[
            ("", true),
            ("spec.nodeName=node-a", true),
            ("spec.nodeName=node-b", false),
            ("spec.nodeName!=node-b", true),
            ("spec.host=node-a", true),
            ("status.phase=Running,spec.nodeName==node-a", true),
            ("status.phase!=Running", false),
            ("status.phase=Pending", false),
            ("spec.hostNetwork=true", true),
            (
                "spec.restartPolicy=Always,spec.schedulerName=default-scheduler",
                true,
            ),
            ("spec.serviceAccountName=builder", true),
            ("status.podIP=10.0.0.9", true),
            ("status.podIPs=10.0.0.9", false),
            ("status.podIPs=", true),
            ("status.nominatedNodeName=", true),
            ("metadata.name=web-1,metadata.namespace=default", true),
            ("metadata.name!=x", true),
            ("metadata.name!=web-1", false),
            (",,metadata.name=web-1,", true),
        ];
        for (sel, want) in cases {
            assert_eq!(fields("pods", sel).matches(&pod), *want, "selector {sel:?}");
        }
        let bare = json!({"metadata": {"name": "p"}, "spec": {}});
        assert!(fields("pods", "spec.hostNetwork=false,spec.nodeName=").matches(&bare));
        assert!(!fields("pods", "spec.nodeName=node-a").matches(&bare));
    }

    #[test]
    fn event_fields_select_by_involved_object() {
        let ev = json!({
            "metadata": {"name": "web.17", "namespace": "default"},
            "involvedObject": {"kind": "Pod", "namespace": "default", "name": "web", "uid": "u-1",
                               "apiVersion": "v1", "resourceVersion": "42", "fieldPath": "spec.containers{c}"},
            "reason": "Started", "type": "Normal", "source": {"component": "kubelet", "host": "n"},
            "reportingComponent": "kubelet",
        });
        let cases: &[(&str, bool)] = &[
            (
                "involvedObject.kind=Pod,involvedObject.name=web,involvedObject.namespace=default",
                true,
            ),
            (
                "involvedObject.uid=u-1,involvedObject.apiVersion=v1,involvedObject.resourceVersion=42",
                true,
            ),
            ("involvedObject.fieldPath=spec.containers{c}", true),
            ("involvedObject.name=db", false),
            ("involvedObject.kind!=Pod", false),
            (
                "reason=Started,type=Normal,source=kubelet,reportingComponent=kubelet",
                true,
            ),
            ("type=Warning", false),
            ("metadata.name=web.17", true),
        ];
        for (sel, want) in cases {
            assert_eq!(
                fields("events", sel).matches(&ev),
                *want,
                "selector {sel:?}"
            );
        }
    }

    #[test]
    fn other_kinds_select_on_their_fields() {
        let node = json!({"metadata": {"name": "n1"}, "spec": {"unschedulable": true}});
        assert!(fields("nodes", "spec.unschedulable=true").matches(&node));
        assert!(
            fields("nodes", "spec.unschedulable=false")
                .matches(&json!({"metadata": {"name": "n2"}}))
        );
        let ns = json!({"metadata": {"name": "kube-system"}, "status": {"phase": "Active"}});
        assert!(
            fields(
                "namespaces",
                "status.phase=Active,metadata.name=kube-system"
            )
            .matches(&ns)
        );
        let secret =
            json!({"metadata": {"name": "s", "namespace": "d"}, "type": "kubernetes.io/tls"});
        assert!(fields("secrets", "type=kubernetes.io/tls").matches(&secret));
        assert!(!fields("secrets", "type=Opaque").matches(&secret));
        let svc = json!({"metadata": {"name": "s"}, "spec": {"clusterIP": "10.96.0.1", "type": "ClusterIP"}});
        assert!(fields("services", "spec.clusterIP=10.96.0.1,spec.type=ClusterIP").matches(&svc));
        let cm = json!({"metadata": {"name": "c", "namespace": "kube-system"}});
        assert!(fields("configmaps", "metadata.namespace=kube-system").matches(&cm));
        assert!(!fields("configmaps", "metadata.namespace!=kube-system").matches(&cm));
        assert!(fields("deployments", "metadata.name=c").matches(&cm));
    }

    #[test]
    fn escaped_values_are_unescaped() {
        let cm = json!({"metadata": {"name": "a,b=c\\d"}});
        let sel = fields("configmaps", r"metadata.name=a\,b\=c\\d");
        assert_eq!(sel.exact_name(), Some("a,b=c\\d"));
        assert!(sel.matches(&cm));
        assert_eq!(sel.to_string(), r"metadata.name=a\,b\=c\\d");
        assert_eq!(escape("x,y=z\\"), r"x\,y\=z\\");
        // An escaped comma does not split terms.
        assert!(fields("configmaps", r"metadata.name!=x\,y,metadata.namespace=").matches(&cm));
    }

    #[test]
    fn field_selector_errors_carry_upstream_messages() {
        let cases: &[(&str, &str, &str)] = &[
            ("pods", "spec.foo=x", "field label not supported: spec.foo"),
            (
                "nodes",
                "metadata.namespace=x",
                "field label not supported: metadata.namespace",
            ),
            (
                "namespaces",
                "metadata.namespace=x",
                "field label not supported: metadata.namespace",
            ),
            (
                "events",
                "involvedObject.foo=x",
                "field label not supported: involvedObject.foo",
            ),
            (
                "replicasets",
                "status.replicas=1",
                "\"status.replicas\" is not a known field selector: only \"metadata.name\", \"metadata.namespace\"",
            ),
            (
                "configmaps",
                "data=x",
                "\"data\" is not a known field selector: only \"metadata.name\", \"metadata.namespace\"",
            ),
            (
                "pods",
                "spec.nodeName",
                "invalid selector: 'spec.nodeName'; can't understand 'spec.nodeName'",
            ),
            (
                "pods",
                "metadata.name=a,b",
                "invalid selector: 'metadata.name=a,b'; can't understand 'b'",
            ),
            (
                "pods",
                r"metadata.name=a\n",
                r"invalid field selector: invalid escape sequence: \n",
            ),
            (
                "pods",
                r"metadata.name=a\",
                r"invalid field selector: invalid escape sequence: \",
            ),
            (
                "pods",
                "metadata.name=a=b",
                "invalid field selector: unescaped character in value: 61",
            ),
        ];
        for (plural, sel, want) in cases {
            assert_eq!(fields_err(plural, sel), *want, "{plural} selector {sel:?}");
        }
        let api = FieldSelector::parse(info("pods"), "spec.foo=x")
            .expect_err("unsupported field")
            .into_api_error();
        assert_eq!((api.code, api.reason), (400, "BadRequest"));
        assert_eq!(api.message, "field label not supported: spec.foo");
    }

    #[test]
    fn exact_name_comes_from_a_pinned_metadata_name() {
        assert_eq!(
            fields("pods", "metadata.name=web").exact_name(),
            Some("web")
        );
        assert_eq!(
            fields("pods", "metadata.name==web,status.phase=Running").exact_name(),
            Some("web")
        );
        assert_eq!(fields("pods", "metadata.name!=web").exact_name(), None);
        assert_eq!(fields("pods", "status.phase=Running").exact_name(), None);
        assert_eq!(fields("pods", "").exact_name(), None);
        assert!(fields("pods", "").is_empty());
        assert!(!fields("pods", "metadata.name=web").is_empty());
        assert_eq!(
            fields("pods", "spec.nodeName=a").exact_match("spec.nodeName"),
            Some("a")
        );
    }

    /// Objects with every selectable field of every kind set, with some
    /// unset, and with odd shapes.
    fn selectable_fixtures() -> Vec<Value> {
        vec![
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "web-1", "namespace": "prod", "uid": "u1",
                    "labels": {"app": "web", "tier": "front"}, "annotations": {"a": "b"},
                    "managedFields": [{"manager": "m", "fieldsV1": {"f:spec": {}}}]},
                "spec": {"nodeName": "n1", "restartPolicy": "Always", "schedulerName": "s",
                    "serviceAccount": "old", "hostNetwork": true, "unschedulable": true,
                    "clusterIP": "10.0.0.1", "type": "NodePort",
                    "containers": [{"name": "c", "image": "busybox"}]},
                "status": {"phase": "Running", "podIP": "10.1.0.1",
                    "podIPs": [{"ip": "10.1.0.2"}], "nominatedNodeName": "n2",
                    "conditions": [{"type": "Ready", "status": "True"}]},
                "type": "Opaque", "reason": "Started", "reportingComponent": "kubelet",
                "source": {"component": "kubelet", "host": "n1"},
                "involvedObject": {"kind": "Pod", "namespace": "prod", "name": "web-1",
                    "uid": "u1", "apiVersion": "v1", "resourceVersion": "7",
                    "fieldPath": "spec.containers{c}"},
                "data": {"k": "dg=="}
            }),
            json!({
                "metadata": {"name": "sparse", "labels": {"tier": "back"}},
                "spec": {"serviceAccountName": "sa", "hostNetwork": false},
                "status": {"podIP": "10.1.0.3"}
            }),
            json!({"metadata": {"name": "odd", "labels": null}, "spec": null,
                "status": "text", "source": null}),
            json!({"kind": "NoMetadata"}),
        ]
    }

    #[test]
    fn selectors_select_the_selectable_part_as_they_select_the_object() {
        let kinds = [
            FieldKind::Pod,
            FieldKind::Node,
            FieldKind::Event,
            FieldKind::Namespace,
            FieldKind::Secret,
            FieldKind::Service,
            FieldKind::Default,
        ];
        let label_selectors = [
            "",
            "app=web",
            "app",
            "!app",
            "tier in (front,back)",
            "tier!=front",
        ];
        for object in selectable_fixtures() {
            let text = object.to_string();
            let part = selectable(text.as_bytes()).expect("fixture projects");
            for kind in kinds {
                for field in kind.accepted() {
                    // The object's own value, and values it does not have.
                    for value in [kind.value(&object, field), String::new(), "x".to_string()] {
                        for negated in [false, true] {
                            let selector = FieldSelector {
                                kind,
                                terms: vec![FieldTerm {
                                    field: field.to_string(),
                                    value: value.clone(),
                                    negated,
                                }],
                            };
                            assert_eq!(
                                selector.matches(&part),
                                selector.matches(&object),
                                "{kind:?} selector {selector} on {text}"
                            );
                        }
                    }
                }
            }
            for sel in label_selectors {
                let selector = LabelSelector::parse(sel).expect("label selector parses");
                assert_eq!(
                    selector.matches_object(&part),
                    selector.matches_object(&object),
                    "label selector {sel:?} on {text}"
                );
            }
        }
    }

    #[test]
    fn the_selectable_part_leaves_the_rest_out() {
        let text = selectable_fixtures()[0].to_string();
        let part = selectable(text.as_bytes()).expect("fixture projects");
        for absent in [
            "/apiVersion",
            "/data",
            "/metadata/uid",
            "/metadata/annotations",
            "/metadata/managedFields",
            "/spec/containers",
            "/status/conditions",
        ] {
            assert!(
                part.pointer(absent).is_none(),
                "{absent} is left out: {part}"
            );
        }
        assert!(selectable(b"[]").is_err(), "not an object");
        assert!(
            selectable(br#"{"spec": {"nodeName": }}"#).is_err(),
            "not JSON"
        );
    }
}

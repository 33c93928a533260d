//! A tiny JSON writer for the console's `--json` output (RFC 8259).
//!
//! Listing commands build their output with [`object`] or [`array`]; nesting is expressed with
//! closures, so every object and array is closed and every separator is placed by construction:
//!
//! ```
//! # use kernel::json;
//! let mut out = String::new();
//! json::object(&mut out, |o| {
//!     o.str("name", "vda");
//!     o.u64("blocks", 2048);
//!     o.array("snapshots", |a| {
//!         a.object(|s| {
//!             s.str("name", "nightly");
//!             s.bool("valid", true);
//!         });
//!     });
//! });
//! assert_eq!(
//!     out,
//!     r#"{"name":"vda","blocks":2048,"snapshots":[{"name":"nightly","valid":true}]}"#
//! );
//! ```
//!
//! The output is compact (no whitespace) and always valid JSON: strings are escaped per
//! RFC 8259 §7, and non-finite floats (which JSON cannot express) are written as `null`.
//! Keys are not checked for duplicates; that is the caller's business.
use alloc::string::String;
use core::fmt::Write;

/// Appends `s` to `out` as a quoted JSON string (RFC 8259 §7): `"` and `\` are escaped,
/// `\n`, `\r`, `\t`, `\b`, `\f` use their short forms, other control characters
/// (U+0000..U+001F and U+007F) become `\u00XX`. Everything else is copied as UTF-8.
pub fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            // DEL is legal unescaped JSON, but escaping it keeps the output safe to print on a
            // terminal.
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Appends a JSON number for `value`; NaN and infinities are written as `null`.
fn write_f64(out: &mut String, value: f64) {
    if value.is_finite() {
        // `Display` for f64 never uses exponent notation and prints "1" for 1.0: both valid JSON.
        let _ = write!(out, "{value}");
    } else {
        out.push_str("null");
    }
}

/// Writes one JSON object to `out`; `build` adds its members.
pub fn object(out: &mut String, build: impl FnOnce(&mut ObjectWriter<'_>)) {
    out.push('{');
    let mut writer = ObjectWriter { out, first: true };
    build(&mut writer);
    writer.out.push('}');
}

/// Writes one JSON array to `out`; `build` adds its elements.
pub fn array(out: &mut String, build: impl FnOnce(&mut ArrayWriter<'_>)) {
    out.push('[');
    let mut writer = ArrayWriter { out, first: true };
    build(&mut writer);
    writer.out.push(']');
}

/// Builds an object with [`object`] and returns it as a new `String`.
pub fn object_string(build: impl FnOnce(&mut ObjectWriter<'_>)) -> String {
    let mut out = String::new();
    object(&mut out, build);
    out
}

/// Builds an array with [`array`] and returns it as a new `String`.
pub fn array_string(build: impl FnOnce(&mut ArrayWriter<'_>)) -> String {
    let mut out = String::new();
    array(&mut out, build);
    out
}

/// Adds members (`"key":value`) to an open JSON object. Created by [`object`].
pub struct ObjectWriter<'a> {
    out: &'a mut String,
    first: bool,
}

impl ObjectWriter<'_> {
    /// Writes the separator and `"key":`.
    fn key(&mut self, key: &str) {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        write_string(self.out, key);
        self.out.push(':');
    }

    /// Adds a string member.
    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        write_string(self.out, value);
        self
    }

    /// Adds a string member, or `null` when `value` is `None`.
    pub fn opt_str(&mut self, key: &str, value: Option<&str>) -> &mut Self {
        match value {
            Some(v) => self.str(key, v),
            None => self.null(key),
        }
    }

    /// Adds an unsigned integer member.
    pub fn u64(&mut self, key: &str, value: u64) -> &mut Self {
        self.key(key);
        let _ = write!(self.out, "{value}");
        self
    }

    /// Adds an unsigned integer member, or `null` when `value` is `None`.
    pub fn opt_u64(&mut self, key: &str, value: Option<u64>) -> &mut Self {
        match value {
            Some(v) => self.u64(key, v),
            None => self.null(key),
        }
    }

    /// Adds a signed integer member.
    pub fn i64(&mut self, key: &str, value: i64) -> &mut Self {
        self.key(key);
        let _ = write!(self.out, "{value}");
        self
    }

    /// Adds a floating-point member (`null` if it is NaN or infinite).
    pub fn f64(&mut self, key: &str, value: f64) -> &mut Self {
        self.key(key);
        write_f64(self.out, value);
        self
    }

    /// Adds a boolean member.
    pub fn bool(&mut self, key: &str, value: bool) -> &mut Self {
        self.key(key);
        self.out.push_str(if value { "true" } else { "false" });
        self
    }

    /// Adds a `null` member.
    pub fn null(&mut self, key: &str) -> &mut Self {
        self.key(key);
        self.out.push_str("null");
        self
    }

    /// Adds a nested object member; `build` adds its members.
    pub fn object(&mut self, key: &str, build: impl FnOnce(&mut ObjectWriter<'_>)) -> &mut Self {
        self.key(key);
        object(self.out, build);
        self
    }

    /// Adds a nested array member; `build` adds its elements.
    pub fn array(&mut self, key: &str, build: impl FnOnce(&mut ArrayWriter<'_>)) -> &mut Self {
        self.key(key);
        array(self.out, build);
        self
    }
}

/// Adds elements to an open JSON array. Created by [`array`].
pub struct ArrayWriter<'a> {
    out: &'a mut String,
    first: bool,
}

impl ArrayWriter<'_> {
    /// Writes the separator before an element.
    fn sep(&mut self) {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
    }

    /// Appends a string element.
    pub fn str(&mut self, value: &str) -> &mut Self {
        self.sep();
        write_string(self.out, value);
        self
    }

    /// Appends an unsigned integer element.
    pub fn u64(&mut self, value: u64) -> &mut Self {
        self.sep();
        let _ = write!(self.out, "{value}");
        self
    }

    /// Appends a signed integer element.
    pub fn i64(&mut self, value: i64) -> &mut Self {
        self.sep();
        let _ = write!(self.out, "{value}");
        self
    }

    /// Appends a floating-point element (`null` if it is NaN or infinite).
    pub fn f64(&mut self, value: f64) -> &mut Self {
        self.sep();
        write_f64(self.out, value);
        self
    }

    /// Appends a boolean element.
    pub fn bool(&mut self, value: bool) -> &mut Self {
        self.sep();
        self.out.push_str(if value { "true" } else { "false" });
        self
    }

    /// Appends a `null` element.
    pub fn null(&mut self) -> &mut Self {
        self.sep();
        self.out.push_str("null");
        self
    }

    /// Appends a nested object element; `build` adds its members.
    pub fn object(&mut self, build: impl FnOnce(&mut ObjectWriter<'_>)) -> &mut Self {
        self.sep();
        object(self.out, build);
        self
    }

    /// Appends a nested array element; `build` adds its elements.
    pub fn array(&mut self, build: impl FnOnce(&mut ArrayWriter<'_>)) -> &mut Self {
        self.sep();
        array(self.out, build);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(s: &str) -> String {
        let mut out = String::new();
        write_string(&mut out, s);
        out
    }

    #[test]
    fn escapes_quotes_backslash_and_short_forms() {
        assert_eq!(escaped(""), r#""""#);
        assert_eq!(escaped("plain"), r#""plain""#);
        assert_eq!(escaped(r#"a"b"#), r#""a\"b""#);
        assert_eq!(escaped(r"a\b"), r#""a\\b""#);
        assert_eq!(escaped("l1\nl2\r\t"), r#""l1\nl2\r\t""#);
        assert_eq!(escaped("\u{08}\u{0c}"), r#""\b\f""#);
        assert_eq!(escaped("/"), r#""/""#);
    }

    #[test]
    fn escapes_other_control_characters_as_u00xx() {
        assert_eq!(escaped("\u{0}"), r#""\u0000""#);
        assert_eq!(escaped("\u{1b}[K"), r#""\u001b[K""#);
        assert_eq!(escaped("\u{1f}\u{7f}"), r#""\u001f\u007f""#);
        // Every control character is escaped; nothing below 0x20 survives raw.
        for b in 0u8..0x20 {
            let s = escaped(&String::from(b as char));
            assert!(s.bytes().all(|c| c >= 0x20), "{b:#x} -> {s:?}");
        }
    }

    #[test]
    fn passes_non_ascii_through() {
        assert_eq!(escaped("é→😀"), "\"é→😀\"");
    }

    #[test]
    fn empty_containers() {
        assert_eq!(object_string(|_| {}), "{}");
        assert_eq!(array_string(|_| {}), "[]");
    }

    #[test]
    fn scalars_in_objects() {
        let s = object_string(|o| {
            o.str("s", "x")
                .u64("u", u64::MAX)
                .i64("i", i64::MIN)
                .bool("t", true)
                .bool("f", false)
                .null("n")
                .opt_str("os", None)
                .opt_u64("ou", Some(7));
        });
        assert_eq!(
            s,
            r#"{"s":"x","u":18446744073709551615,"i":-9223372036854775808,"t":true,"f":false,"n":null,"os":null,"ou":7}"#
        );
    }

    #[test]
    fn floats_and_non_finite() {
        let s = array_string(|a| {
            a.f64(1.5)
                .f64(1.0)
                .f64(-0.25)
                .f64(f64::NAN)
                .f64(f64::INFINITY);
        });
        assert_eq!(s, "[1.5,1,-0.25,null,null]");
    }

    #[test]
    fn keys_are_escaped() {
        assert_eq!(
            object_string(|o| {
                o.u64("a\"b", 1);
            }),
            r#"{"a\"b":1}"#
        );
    }

    #[test]
    fn nesting() {
        let s = object_string(|o| {
            o.array("devs", |a| {
                a.object(|d| {
                    d.str("name", "vda").u64("size", 4096);
                });
                a.object(|d| {
                    d.str("name", "nvme0n1").array("tags", |t| {
                        t.str("origin").array(|_| {});
                    });
                });
            });
            o.object("empty", |_| {});
            o.u64("count", 2);
        });
        assert_eq!(
            s,
            r#"{"devs":[{"name":"vda","size":4096},{"name":"nvme0n1","tags":["origin",[]]}],"empty":{},"count":2}"#
        );
    }

    #[test]
    fn appends_to_existing_buffer() {
        let mut out = String::from("prefix ");
        array(&mut out, |a| {
            a.u64(1).i64(-1).null().bool(true);
        });
        assert_eq!(out, "prefix [1,-1,null,true]");
    }
}

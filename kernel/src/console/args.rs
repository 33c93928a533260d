//! Argument tokenizing and typed parsing for console commands.
//!
//! A command line goes through three steps:
//! 1. [`tokenize`] splits it into words at whitespace; `"double quotes"` group words (inside
//!    them `\"` and `\\` stand for `"` and `\`).
//! 2. [`Args::parse`] sorts the words after the command name into options (`--name value`,
//!    `--name=value`, `--flag`) and positional arguments, checked against the command's
//!    [`CommandSpec`]: unknown options, missing values, repeated options and a wrong number of
//!    positional arguments are errors. `--` ends the options.
//! 3. The command reads typed values with [`Args::value_as`] / [`Args::arg_as`] and the parsers
//!    here: [`parse_u64`] (decimal or `0x` hex), [`parse_size`] (`4k`, `1MiB`, `512`),
//!    [`parse_duration`] (`10s`, `500ms`, `2m`), [`parse_byte`] (`0xNN`).
//!
//! Every failure is an [`ArgError`] whose `Display` is one line for the operator, e.g.
//! `invalid number 'abc' for LBA`.
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use core::time::Duration;

/// Why a command's arguments were rejected. `Display` gives one line for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArgError {
    /// A `"` was opened and never closed.
    UnterminatedQuote,
    /// Not a number (`what` names the argument, e.g. `LBA` or `--count`).
    InvalidNumber { value: String, what: String },
    /// A number that does not fit the argument's type.
    NumberTooLarge { value: String, what: String },
    /// Not a size such as `512`, `4k` or `1MiB`.
    InvalidSize { value: String, what: String },
    /// Not a duration such as `10s`, `500ms` or `2m`.
    InvalidDuration { value: String, what: String },
    /// Not a byte value (`0xNN` or 0..=255).
    InvalidByte { value: String, what: String },
    /// A value that parsed but is not acceptable; `expected` says what is.
    InvalidValue {
        value: String,
        what: String,
        expected: &'static str,
    },
    /// An option the command does not take.
    UnknownOption(String),
    /// An option that takes a value was given none.
    MissingValue(&'static str),
    /// A flag was given a value (`--json=1`).
    UnexpectedValue(&'static str),
    /// An option given more than once.
    DuplicateOption(&'static str),
    /// A required positional argument is missing.
    MissingArgument(&'static str),
    /// More positional arguments than the command takes.
    ExtraArgument(String),
}

/// Shows operator input in an error message: control characters become `?` and very long
/// values are cut, so an error is always one short line.
struct Shown<'a>(&'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX_CHARS: usize = 40;
        for (i, c) in self.0.chars().enumerate() {
            if i == MAX_CHARS {
                return f.write_str("...");
            }
            let c = if c.is_control() { '?' } else { c };
            fmt::Write::write_char(f, c)?;
        }
        Ok(())
    }
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::UnterminatedQuote => f.write_str("unterminated quote"),
            ArgError::InvalidNumber { value, what } => {
                write!(f, "invalid number '{}' for {what}", Shown(value))
            }
            ArgError::NumberTooLarge { value, what } => {
                write!(f, "number '{}' too large for {what}", Shown(value))
            }
            ArgError::InvalidSize { value, what } => write!(
                f,
                "invalid size '{}' for {what} (use e.g. 512, 4k, 1m)",
                Shown(value)
            ),
            ArgError::InvalidDuration { value, what } => write!(
                f,
                "invalid duration '{}' for {what} (use e.g. 500ms, 10s, 2m)",
                Shown(value)
            ),
            ArgError::InvalidByte { value, what } => write!(
                f,
                "invalid byte '{}' for {what} (use 0x00..0xff)",
                Shown(value)
            ),
            ArgError::InvalidValue {
                value,
                what,
                expected,
            } => write!(
                f,
                "invalid value '{}' for {what} (expected {expected})",
                Shown(value)
            ),
            ArgError::UnknownOption(option) => write!(f, "unknown option '{}'", Shown(option)),
            ArgError::MissingValue(name) => write!(f, "option --{name} needs a value"),
            ArgError::UnexpectedValue(name) => write!(f, "option --{name} takes no value"),
            ArgError::DuplicateOption(name) => write!(f, "option --{name} given more than once"),
            ArgError::MissingArgument(name) => write!(f, "missing argument <{name}>"),
            ArgError::ExtraArgument(arg) => write!(f, "unexpected argument '{}'", Shown(arg)),
        }
    }
}

/// Splits a command line into words. Whitespace separates words; `"..."` keeps whitespace
/// inside a word (and `""` is an empty word); inside quotes `\"` and `\\` stand for `"` and `\`.
/// Quotes may join text: `a"b c"` is the one word `ab c`.
pub fn tokenize(line: &str) -> Result<Vec<String>, ArgError> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '"' {
            in_word = true;
            loop {
                match chars.next() {
                    None => return Err(ArgError::UnterminatedQuote),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        None => return Err(ArgError::UnterminatedQuote),
                        Some(escaped @ ('"' | '\\')) => word.push(escaped),
                        Some(other) => {
                            word.push('\\');
                            word.push(other);
                        }
                    },
                    Some(other) => word.push(other),
                }
            }
        } else if c.is_whitespace() {
            if in_word {
                words.push(core::mem::take(&mut word));
                in_word = false;
            }
        } else {
            in_word = true;
            word.push(c);
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// Parses an unsigned integer: decimal (`4096`) or hexadecimal with `0x`/`0X` (`0x1000`).
/// `what` names the argument in the error (`LBA`, `--count`).
pub fn parse_u64(value: &str, what: &str) -> Result<u64, ArgError> {
    let (digits, radix) = match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => (hex, 16),
        None => (value, 10),
    };
    parse_digits(digits, radix).map_err(|kind| kind.into_error(value, what))
}

/// Parses an unsigned integer that must fit in a `u32` (decimal or `0x` hex).
pub fn parse_u32(value: &str, what: &str) -> Result<u32, ArgError> {
    let n = parse_u64(value, what)?;
    u32::try_from(n).map_err(|_| ArgError::NumberTooLarge {
        value: value.to_string(),
        what: what.to_string(),
    })
}

/// How a string of digits failed to parse.
enum DigitsError {
    Invalid,
    TooLarge,
}

impl DigitsError {
    fn into_error(self, value: &str, what: &str) -> ArgError {
        let (value, what) = (value.to_string(), what.to_string());
        match self {
            DigitsError::Invalid => ArgError::InvalidNumber { value, what },
            DigitsError::TooLarge => ArgError::NumberTooLarge { value, what },
        }
    }
}

/// Parses a non-empty string of digits in `radix` (no sign, no separators), checking overflow.
fn parse_digits(digits: &str, radix: u32) -> Result<u64, DigitsError> {
    if digits.is_empty() {
        return Err(DigitsError::Invalid);
    }
    let mut n: u64 = 0;
    for c in digits.chars() {
        let d = c.to_digit(radix).ok_or(DigitsError::Invalid)?;
        n = n
            .checked_mul(u64::from(radix))
            .and_then(|n| n.checked_add(u64::from(d)))
            .ok_or(DigitsError::TooLarge)?;
    }
    Ok(n)
}

/// Parses a size in bytes: a decimal number with an optional binary suffix (`k`, `m`, `g`, `t`,
/// in any case, optionally followed by `b` or `ib`: `4k` = `4K` = `4KiB` = `4kb` = 4096), a
/// plain number of bytes (`512`, `512b`), or a `0x` hex number of bytes (no suffix).
pub fn parse_size(value: &str, what: &str) -> Result<u64, ArgError> {
    let invalid = || ArgError::InvalidSize {
        value: value.to_string(),
        what: what.to_string(),
    };
    if value.starts_with("0x") || value.starts_with("0X") {
        return parse_u64(value, what).map_err(|e| match e {
            ArgError::InvalidNumber { .. } => invalid(),
            other => other,
        });
    }
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, suffix) = value.split_at(split);
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(invalid()),
    };
    let n = parse_digits(digits, 10).map_err(|kind| match kind {
        DigitsError::Invalid => invalid(),
        DigitsError::TooLarge => kind.into_error(value, what),
    })?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| DigitsError::TooLarge.into_error(value, what))
}

/// Parses a duration: a decimal number with a unit `ms`, `s`, `m` (minutes) or `h`, or with
/// `us` for microseconds. A bare number is seconds (as fio's `runtime`).
pub fn parse_duration(value: &str, what: &str) -> Result<Duration, ArgError> {
    let invalid = || ArgError::InvalidDuration {
        value: value.to_string(),
        what: what.to_string(),
    };
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, unit) = value.split_at(split);
    let n = parse_digits(digits, 10).map_err(|kind| match kind {
        DigitsError::Invalid => invalid(),
        DigitsError::TooLarge => kind.into_error(value, what),
    })?;
    let too_large = || DigitsError::TooLarge.into_error(value, what);
    Ok(match unit {
        "us" => Duration::from_micros(n),
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" | "min" => Duration::from_secs(n.checked_mul(60).ok_or_else(too_large)?),
        "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(too_large)?),
        _ => return Err(invalid()),
    })
}

/// Parses a byte value: `0xNN` hex or decimal 0..=255 (for fill patterns).
pub fn parse_byte(value: &str, what: &str) -> Result<u8, ArgError> {
    let invalid = || ArgError::InvalidByte {
        value: value.to_string(),
        what: what.to_string(),
    };
    let n = parse_u64(value, what).map_err(|_| invalid())?;
    u8::try_from(n).map_err(|_| invalid())
}

/// One option a command takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptSpec {
    /// The name without the leading `--`.
    pub name: &'static str,
    /// Whether the option takes a value (`--bs 4k`) or is a flag (`--json`).
    pub takes_value: bool,
}

impl OptSpec {
    /// A flag: `--name`.
    pub const fn flag(name: &'static str) -> OptSpec {
        OptSpec {
            name,
            takes_value: false,
        }
    }

    /// An option with a value: `--name value` or `--name=value`.
    pub const fn value(name: &'static str) -> OptSpec {
        OptSpec {
            name,
            takes_value: true,
        }
    }
}

/// What a command accepts after its name: options, then required and optional positional
/// arguments (by name, for error messages and lookup with [`Args::arg`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommandSpec {
    /// The options the command takes.
    pub options: &'static [OptSpec],
    /// Positional arguments that must be present, in order.
    pub required: &'static [&'static str],
    /// Positional arguments that may follow the required ones, in order.
    pub optional: &'static [&'static str],
}

/// A command's arguments, checked against its [`CommandSpec`].
#[derive(Clone, Debug)]
pub struct Args<'a> {
    spec: &'a CommandSpec,
    /// Options given: the spec entry and the value (`None` for flags).
    options: Vec<(&'static str, Option<&'a str>)>,
    positional: Vec<&'a str>,
}

impl<'a> Args<'a> {
    /// Checks `words` (the words after the command name) against `spec`.
    pub fn parse<S: AsRef<str>>(
        words: &'a [S],
        spec: &'a CommandSpec,
    ) -> Result<Args<'a>, ArgError> {
        let mut args = Args {
            spec,
            options: Vec::new(),
            positional: Vec::new(),
        };
        let mut words = words.iter().map(AsRef::as_ref);
        let mut options_done = false;
        while let Some(word) = words.next() {
            if options_done || !is_option(word) {
                args.positional.push(word);
                continue;
            }
            if word == "--" {
                options_done = true;
                continue;
            }
            let unknown = || ArgError::UnknownOption(word.to_string());
            let body = word.strip_prefix("--").ok_or_else(unknown)?;
            let (name, inline_value) = match body.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (body, None),
            };
            let opt = spec
                .options
                .iter()
                .find(|o| o.name == name)
                .ok_or_else(unknown)?;
            if args.options.iter().any(|(n, _)| *n == opt.name) {
                return Err(ArgError::DuplicateOption(opt.name));
            }
            let value = match (opt.takes_value, inline_value) {
                (false, None) => None,
                (false, Some(_)) => return Err(ArgError::UnexpectedValue(opt.name)),
                (true, Some(value)) => Some(value),
                (true, None) => match words.next() {
                    Some(value) if !value.starts_with("--") => Some(value),
                    _ => return Err(ArgError::MissingValue(opt.name)),
                },
            };
            args.options.push((opt.name, value));
        }
        if let Some(missing) = spec.required.get(args.positional.len()) {
            return Err(ArgError::MissingArgument(missing));
        }
        let max = spec.required.len() + spec.optional.len();
        if let Some(extra) = args.positional.get(max) {
            return Err(ArgError::ExtraArgument(extra.to_string()));
        }
        Ok(args)
    }

    /// Whether the flag (or valued option) `name` was given.
    pub fn flag(&self, name: &str) -> bool {
        self.options.iter().any(|(n, _)| *n == name)
    }

    /// The value of option `name`, if given.
    pub fn value(&self, name: &str) -> Option<&'a str> {
        self.options
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, value)| *value)
    }

    /// The value of option `name` parsed with `parse` (e.g. [`parse_size`]), if given. Errors
    /// name the option as `--name`.
    pub fn value_as<T>(
        &self,
        name: &str,
        parse: impl FnOnce(&str, &str) -> Result<T, ArgError>,
    ) -> Result<Option<T>, ArgError> {
        match self.value(name) {
            Some(value) => parse(value, &alloc::format!("--{name}")).map(Some),
            None => Ok(None),
        }
    }

    /// The positional argument called `name` in the spec, if given.
    pub fn arg(&self, name: &str) -> Option<&'a str> {
        let index = self
            .spec
            .required
            .iter()
            .chain(self.spec.optional)
            .position(|n| *n == name)?;
        self.positional.get(index).copied()
    }

    /// The positional argument `name` parsed with `parse`; errors name it as given in the spec.
    /// A required argument is always present after [`Args::parse`]; for an optional one that
    /// is absent this returns `MissingArgument`.
    pub fn arg_as<T>(
        &self,
        name: &'static str,
        parse: impl FnOnce(&str, &str) -> Result<T, ArgError>,
    ) -> Result<T, ArgError> {
        let value = self.arg(name).ok_or(ArgError::MissingArgument(name))?;
        parse(value, name)
    }

    /// All positional arguments, in order.
    pub fn positional(&self) -> &[&'a str] {
        &self.positional
    }
}

/// Whether a word is an option (or `--`) rather than a positional argument. `-5` and `-` are
/// positional; anything else starting with `-` is an option (so a mistyped `-json` is reported
/// as an unknown option rather than taken as a device name).
fn is_option(word: &str) -> bool {
    let mut chars = word.chars();
    chars.next() == Some('-') && chars.next().is_some_and(|c| !c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    fn words(line: &str) -> Vec<String> {
        tokenize(line).expect("tokenize")
    }

    #[test]
    fn tokenize_whitespace() {
        assert_eq!(words(""), Vec::<String>::new());
        assert_eq!(words("   \t "), Vec::<String>::new());
        assert_eq!(words("ls"), ["ls"]);
        assert_eq!(words("  read  vda 0x10\t8 "), ["read", "vda", "0x10", "8"]);
    }

    #[test]
    fn tokenize_quotes() {
        assert_eq!(words(r#"create "my snap" x"#), ["create", "my snap", "x"]);
        assert_eq!(words(r#"a "" b"#), ["a", "", "b"]);
        assert_eq!(words(r#""""#), [""]);
        assert_eq!(words(r#"pre"fix mid"post"#), ["prefix midpost"]);
        assert_eq!(words(r#""say \"hi\" \\ \n""#), [r#"say "hi" \ \n"#]);
        assert_eq!(words(r"x\y"), [r"x\y"]);
    }

    #[test]
    fn tokenize_unterminated_quote() {
        assert_eq!(tokenize(r#"echo "abc"#), Err(ArgError::UnterminatedQuote));
        assert_eq!(tokenize(r#"""#), Err(ArgError::UnterminatedQuote));
        assert_eq!(tokenize(r#""abc\"#), Err(ArgError::UnterminatedQuote));
        assert_eq!(tokenize(r#""abc\""#), Err(ArgError::UnterminatedQuote));
        assert_eq!(
            ArgError::UnterminatedQuote.to_string(),
            "unterminated quote"
        );
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_u64("0", "n"), Ok(0));
        assert_eq!(parse_u64("4096", "n"), Ok(4096));
        assert_eq!(parse_u64("0x1000", "n"), Ok(4096));
        assert_eq!(parse_u64("0XfF", "n"), Ok(255));
        assert_eq!(parse_u64("007", "n"), Ok(7));
        assert_eq!(parse_u64("18446744073709551615", "n"), Ok(u64::MAX));
        assert_eq!(parse_u64("0xffffffffffffffff", "n"), Ok(u64::MAX));
        for bad in [
            "", "abc", "0x", "-1", "+1", "1.5", "1 2", "0x1g", "1_000", "١",
        ] {
            assert!(
                matches!(parse_u64(bad, "n"), Err(ArgError::InvalidNumber { .. })),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_u64("abc", "LBA").unwrap_err().to_string(),
            "invalid number 'abc' for LBA"
        );
    }

    #[test]
    fn number_overflow() {
        for big in [
            "18446744073709551616",
            "99999999999999999999999",
            "0x10000000000000000",
        ] {
            assert!(
                matches!(parse_u64(big, "n"), Err(ArgError::NumberTooLarge { .. })),
                "{big}"
            );
        }
        assert_eq!(parse_u32("4294967295", "n"), Ok(u32::MAX));
        assert_eq!(
            parse_u32("4294967296", "--qd").unwrap_err().to_string(),
            "number '4294967296' too large for --qd"
        );
    }

    #[test]
    fn sizes() {
        let cases: &[(&str, u64)] = &[
            ("0", 0),
            ("512", 512),
            ("512b", 512),
            ("512B", 512),
            ("4k", 4096),
            ("4K", 4096),
            ("4kb", 4096),
            ("4KiB", 4096),
            ("64KiB", 65536),
            ("1m", 1 << 20),
            ("1M", 1 << 20),
            ("1MiB", 1 << 20),
            ("2g", 2 << 30),
            ("1t", 1 << 40),
            ("0x200", 512),
            ("16777215t", 16_777_215u64 << 40),
        ];
        for &(text, bytes) in cases {
            assert_eq!(parse_size(text, "--bs"), Ok(bytes), "{text}");
        }
        for bad in [
            "", "k", "4q", "4kk", "4 k", "-4k", "1.5m", "0x", "0xzz", "4kib2",
        ] {
            assert!(
                matches!(parse_size(bad, "--bs"), Err(ArgError::InvalidSize { .. })),
                "{bad:?}"
            );
        }
        for big in ["16777216t", "18014398509481984k", "99999999999999999999"] {
            assert!(
                matches!(
                    parse_size(big, "--bs"),
                    Err(ArgError::NumberTooLarge { .. })
                ),
                "{big}"
            );
        }
        assert_eq!(
            parse_size("4q", "--bs").unwrap_err().to_string(),
            "invalid size '4q' for --bs (use e.g. 512, 4k, 1m)"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s", "t"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10", "t"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms", "t"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("250us", "t"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("2m", "t"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("2min", "t"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h", "t"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s", "t"), Ok(Duration::ZERO));
        for bad in ["", "s", "10x", "1.5s", "-1s", "10 s", "10S", "0x10s"] {
            assert!(
                matches!(
                    parse_duration(bad, "t"),
                    Err(ArgError::InvalidDuration { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_duration("18446744073709551615h", "t"),
            Err(ArgError::NumberTooLarge { .. })
        ));
        assert!(matches!(
            parse_duration("99999999999999999999s", "t"),
            Err(ArgError::NumberTooLarge { .. })
        ));
        assert_eq!(
            parse_duration("ten", "--time").unwrap_err().to_string(),
            "invalid duration 'ten' for --time (use e.g. 500ms, 10s, 2m)"
        );
    }

    #[test]
    fn bytes() {
        assert_eq!(parse_byte("0xa5", "p"), Ok(0xa5));
        assert_eq!(parse_byte("0x00", "p"), Ok(0));
        assert_eq!(parse_byte("0xFF", "p"), Ok(0xff));
        assert_eq!(parse_byte("255", "p"), Ok(255));
        for bad in ["", "0x100", "256", "0x", "zz", "-1"] {
            assert!(
                matches!(parse_byte(bad, "p"), Err(ArgError::InvalidByte { .. })),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_byte("0x1ff", "--pattern").unwrap_err().to_string(),
            "invalid byte '0x1ff' for --pattern (use 0x00..0xff)"
        );
    }

    const WRITE: CommandSpec = CommandSpec {
        options: &[
            OptSpec::value("pattern"),
            OptSpec::value("count"),
            OptSpec::flag("fua"),
            OptSpec::flag("json"),
        ],
        required: &["device", "lba"],
        optional: &["blocks"],
    };

    /// `(fua, json, pattern, lba, blocks)` as the `write` command would read them.
    type Parsed = (bool, bool, Option<u8>, u64, Option<u64>);

    fn parse(line: &str) -> Result<Parsed, ArgError> {
        let w = words(line);
        let args = Args::parse(&w, &WRITE)?;
        let pattern = args.value_as("pattern", parse_byte)?;
        let lba = args.arg_as("lba", parse_u64)?;
        let blocks = match args.arg("blocks") {
            Some(_) => Some(args.arg_as("blocks", parse_u64)?),
            None => None,
        };
        assert_eq!(args.arg("device"), Some("vda"));
        Ok((args.flag("fua"), args.flag("json"), pattern, lba, blocks))
    }

    #[test]
    fn args_options_and_positionals() {
        assert_eq!(parse("vda 0x10"), Ok((false, false, None, 16, None)));
        assert_eq!(
            parse("--fua vda --pattern 0xa5 8 --json 4"),
            Ok((true, true, Some(0xa5), 8, Some(4)))
        );
        assert_eq!(
            parse("vda --pattern=0x5a 8"),
            Ok((false, false, Some(0x5a), 8, None))
        );
        let w = words("vda 1 -- --json");
        const SPEC: CommandSpec = CommandSpec {
            options: &[OptSpec::flag("json")],
            required: &["device"],
            optional: &["a", "b"],
        };
        let args = Args::parse(&w, &SPEC).expect("parse");
        assert!(!args.flag("json"));
        assert_eq!(args.positional(), ["vda", "1", "--json"]);
        assert_eq!(args.arg("b"), Some("--json"));
        assert_eq!(args.arg("nope"), None);
    }

    #[test]
    fn args_errors() {
        let cases = [
            ("vda 0 --bogus", "unknown option '--bogus'"),
            ("vda 0 -json", "unknown option '-json'"),
            ("vda 0 ---json", "unknown option '---json'"),
            ("vda 0 --pattern", "option --pattern needs a value"),
            ("vda 0 --pattern --json", "option --pattern needs a value"),
            ("vda 0 --json=yes", "option --json takes no value"),
            ("vda 0 --json --json", "option --json given more than once"),
            (
                "vda 0 --pattern 1 --pattern=2",
                "option --pattern given more than once",
            ),
            ("", "missing argument <device>"),
            ("vda", "missing argument <lba>"),
            ("vda 0 1 2", "unexpected argument '2'"),
            ("vda zero", "invalid number 'zero' for lba"),
            (
                "vda 0 --pattern 0x100",
                "invalid byte '0x100' for --pattern (use 0x00..0xff)",
            ),
        ];
        for (line, message) in cases {
            assert_eq!(parse(line).unwrap_err().to_string(), message, "{line:?}");
        }
    }

    #[test]
    fn args_empty_value_and_negative_number() {
        const SPEC: CommandSpec = CommandSpec {
            options: &[OptSpec::value("name")],
            required: &[],
            optional: &["n"],
        };
        let w = words(r#"--name "" -5"#);
        let args = Args::parse(&w, &SPEC).expect("parse");
        assert_eq!(args.value("name"), Some(""));
        assert_eq!(args.arg("n"), Some("-5"));
        assert_eq!(
            args.arg_as("n", parse_u64).unwrap_err().to_string(),
            "invalid number '-5' for n"
        );
        let w: [&str; 0] = [];
        let args = Args::parse(&w, &SPEC).expect("parse");
        assert_eq!(args.value_as("name", parse_u64), Ok(None));
        assert_eq!(
            args.arg_as("n", parse_u64),
            Err(ArgError::MissingArgument("n"))
        );
    }

    #[test]
    fn error_display_is_one_short_line() {
        let long = "x".repeat(500);
        let e = parse_u64(&format!("{long}\n\x1b"), "LBA").unwrap_err();
        let text = e.to_string();
        assert!(!text.contains('\n') && !text.contains('\x1b'));
        assert!(text.len() < 100, "{text}");
        let e = ArgError::ExtraArgument("a\tb".to_string());
        assert_eq!(e.to_string(), "unexpected argument 'a?b'");
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let pool: Vec<char> = "ab0x1kKmMs-=\" \\\t\u{0}é9".chars().collect();
        const SPEC: CommandSpec = CommandSpec {
            options: &[OptSpec::value("v"), OptSpec::flag("f")],
            required: &["a"],
            optional: &["b"],
        };
        for _ in 0..5000 {
            let mut s = String::new();
            for _ in 0..(seed % 24) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                s.push(pool[(seed % pool.len() as u64) as usize]);
            }
            let _ = parse_u64(&s, "x");
            let _ = parse_size(&s, "x");
            let _ = parse_duration(&s, "x");
            let _ = parse_byte(&s, "x");
            if let Ok(w) = tokenize(&s) {
                if let Ok(args) = Args::parse(&w, &SPEC) {
                    let _ = args.value_as("v", parse_size);
                    let _ = args.arg_as("b", parse_u64);
                }
            }
        }
    }
}

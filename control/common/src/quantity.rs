//! Resource quantities (`500m`, `1Gi`, `1e3`) as upstream's
//! `resource.Quantity`: parsed exactly, compared by value (`1` = `1000m`),
//! printed canonically. The API server's defaulting and validation, the
//! pod QoS class, the scheduler's resource accounting and the agent's
//! cgroup limits all read quantities through this one parser.

/// The regex upstream quotes when a quantity does not parse.
pub const QUANTITY_FMT: &str = "^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$";

/// A quantity that does not parse, with upstream's messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// Not a number with an optional suffix.
    #[error("quantities must match the regular expression '{QUANTITY_FMT}'")]
    Syntax,
    /// A number with a suffix that is none of upstream's.
    #[error("unable to parse quantity's suffix")]
    Suffix,
}

/// `n / d` rounded towards positive infinity.
fn ceil_div(n: i128, d: i128) -> i128 {
    let q = n / d;
    if n % d > 0 { q + 1 } else { q }
}

fn clamp(n: i128) -> i64 {
    i64::try_from(n).unwrap_or(if n < 0 { i64::MIN } else { i64::MAX })
}

/// How a quantity was written, which decides how it prints canonically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantityFormat {
    /// `500m`, `1G`: decimal SI suffixes.
    DecimalSi,
    /// `1Gi`: binary SI suffixes.
    BinarySi,
    /// `1e3`.
    DecimalExponent,
}

/// A parsed resource quantity, held exactly in units of 10^-9 (upstream
/// rounds anything finer up to nano units).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity {
    /// The value in units of 10^-9.
    pub nanos: i128,
    /// How it was written.
    pub format: QuantityFormat,
}

impl Quantity {
    /// Parse a quantity; the error prints upstream's message.
    pub fn parse(text: &str) -> Result<Quantity, QuantityError> {
        let wrong = || QuantityError::Syntax;
        let (negative, rest) = match text.as_bytes().first() {
            Some(b'-') => (true, &text[1..]),
            Some(b'+') => (false, &text[1..]),
            _ => (false, text),
        };
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, suffix) = rest.split_at(split);
        if number.is_empty() || number.matches('.').count() > 1 || number == "." {
            return Err(wrong());
        }
        let (format, ten_exp, two_exp): (QuantityFormat, i32, u32) = match suffix {
            "" => (QuantityFormat::DecimalSi, 0, 0),
            "n" => (QuantityFormat::DecimalSi, -9, 0),
            "u" => (QuantityFormat::DecimalSi, -6, 0),
            "m" => (QuantityFormat::DecimalSi, -3, 0),
            "k" => (QuantityFormat::DecimalSi, 3, 0),
            "M" => (QuantityFormat::DecimalSi, 6, 0),
            "G" => (QuantityFormat::DecimalSi, 9, 0),
            "T" => (QuantityFormat::DecimalSi, 12, 0),
            "P" => (QuantityFormat::DecimalSi, 15, 0),
            "E" => (QuantityFormat::DecimalSi, 18, 0),
            "Ki" => (QuantityFormat::BinarySi, 0, 10),
            "Mi" => (QuantityFormat::BinarySi, 0, 20),
            "Gi" => (QuantityFormat::BinarySi, 0, 30),
            "Ti" => (QuantityFormat::BinarySi, 0, 40),
            "Pi" => (QuantityFormat::BinarySi, 0, 50),
            "Ei" => (QuantityFormat::BinarySi, 0, 60),
            s if s.starts_with(['e', 'E']) => {
                let exp: i32 = s[1..].parse().map_err(|_| wrong())?;
                (QuantityFormat::DecimalExponent, exp, 0)
            }
            s if s
                .chars()
                .all(|c| "eEinumkKMGTP+-".contains(c) || c.is_ascii_digit()) =>
            {
                return Err(QuantityError::Suffix);
            }
            _ => return Err(wrong()),
        };
        let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
        let digits = format!("{int_part}{frac_part}");
        let mut mantissa: i128 = 0;
        for d in digits.bytes() {
            mantissa = mantissa
                .saturating_mul(10)
                .saturating_add(i128::from(d - b'0'));
        }
        // value = mantissa * 10^(ten_exp - frac_len + 9) * 2^two_exp nanos.
        let scale = ten_exp - frac_part.len() as i32 + 9;
        let mut nanos = mantissa;
        if scale >= 0 {
            nanos = nanos.saturating_mul(10i128.saturating_pow(scale as u32));
        } else {
            let div = 10i128.checked_pow((-scale) as u32);
            nanos = match div {
                // Upstream rounds sub-nano precision up.
                Some(div) => (nanos + div - 1) / div,
                None => i128::from(nanos != 0),
            };
        }
        nanos = nanos.saturating_mul(1i128 << two_exp);
        if negative {
            nanos = -nanos;
        }
        Ok(Quantity { nanos, format })
    }

    /// Upstream's `MilliValue()`: thousandths, rounded up, clamped to i64
    /// (cpu in millicores).
    pub fn milli_value(&self) -> i64 {
        clamp(ceil_div(self.nanos, 1_000_000))
    }

    /// Upstream's `Value()`: whole units, rounded up, clamped to i64 (bytes
    /// of memory, a count of pods).
    pub fn value(&self) -> i64 {
        clamp(ceil_div(self.nanos, 1_000_000_000))
    }

    /// Upstream's canonical `String()`.
    pub fn canonical(&self) -> String {
        if self.nanos == 0 {
            return "0".to_string();
        }
        const NANO: i128 = 1_000_000_000;
        if self.format == QuantityFormat::BinarySi && self.nanos % NANO == 0 {
            let whole = self.nanos / NANO;
            let suffixes = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
            for (i, suffix) in suffixes.iter().enumerate().rev() {
                let unit = 1i128 << (10 * (i as u32 + 1));
                if whole.abs() >= unit && whole % unit == 0 {
                    return format!("{}{suffix}", whole / unit);
                }
            }
            if whole.abs() < 1024 {
                return whole.to_string();
            }
        }
        // Decimal: the largest power of 1000 that divides the value exactly.
        let suffixes: [(i32, &str); 10] = [
            (18, "E"),
            (15, "P"),
            (12, "T"),
            (9, "G"),
            (6, "M"),
            (3, "k"),
            (0, ""),
            (-3, "m"),
            (-6, "u"),
            (-9, "n"),
        ];
        for (exp, suffix) in suffixes {
            let unit = 10i128.pow((exp + 9) as u32);
            if self.nanos % unit == 0 {
                let value = self.nanos / unit;
                return match (self.format, exp) {
                    (QuantityFormat::DecimalExponent, 0) => value.to_string(),
                    (QuantityFormat::DecimalExponent, e) => format!("{value}e{e}"),
                    _ => format!("{value}{suffix}"),
                };
            }
        }
        format!("{}n", self.nanos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_and_print_canonically() {
        for (text, canonical) in [
            ("500m", "500m"),
            ("0.5", "500m"),
            ("1", "1"),
            ("1000m", "1"),
            ("1Gi", "1Gi"),
            ("1024Mi", "1Gi"),
            ("1.5Gi", "1536Mi"),
            ("128974848", "128974848"),
            ("129M", "129M"),
            ("1e3", "1e3"),
            ("100n", "100n"),
        ] {
            let q = Quantity::parse(text).expect(text);
            assert_eq!(q.canonical(), canonical, "{text}");
        }
        assert_eq!(
            Quantity::parse("1Gi").expect("1Gi").nanos,
            Quantity::parse("1073741824").expect("n").nanos
        );
        for bad in ["", "lots", "1.2.3", "1Qi", "Gi"] {
            assert!(Quantity::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn values_round_up_as_upstream() {
        let q = |s: &str| Quantity::parse(s).expect(s);
        assert_eq!(q("500m").milli_value(), 500);
        assert_eq!(q("1").milli_value(), 1000);
        assert_eq!(q("0.1m").milli_value(), 1);
        assert_eq!(q("64Mi").value(), 64 << 20);
        assert_eq!(q("1500m").value(), 2);
        assert_eq!(q("1e40").value(), i64::MAX);
        assert_eq!(q("1").nanos, q("1000m").nanos);
        // What the agent's cgroup limits read.
        assert_eq!(q("2").value(), 2);
        assert_eq!(q("1G").value(), 1_000_000_000);
        assert!(Quantity::parse("x").is_err());
    }
}

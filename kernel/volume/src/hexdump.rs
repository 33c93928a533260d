//! `hexdump -C` style output, with repeated lines folded into `*`.

use core::fmt::{self, Write};

/// Writes `data`, whose first byte is at `offset`, as hexdump lines.
pub fn write_hexdump(out: &mut dyn Write, data: &[u8], offset: u64) -> fmt::Result {
    let mut previous: Option<&[u8]> = None;
    let mut folded = false;
    for (i, line) in data.chunks(16).enumerate() {
        let at = offset + (i * 16) as u64;
        if previous == Some(line) && line.len() == 16 {
            if !folded {
                writeln!(out, "*")?;
                folded = true;
            }
            continue;
        }
        folded = false;
        previous = Some(line);
        write!(out, "{at:08x}  ")?;
        for j in 0..16 {
            match line.get(j) {
                Some(b) => write!(out, "{b:02x} ")?,
                None => write!(out, "   ")?,
            }
            if j == 7 {
                write!(out, " ")?;
            }
        }
        write!(out, " |")?;
        for b in line {
            let c = if (0x20..0x7f).contains(b) {
                *b as char
            } else {
                '.'
            };
            out.write_char(c)?;
        }
        writeln!(out, "|")?;
    }
    writeln!(out, "{:08x}", offset + data.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_and_folding() {
        let mut data = vec![0u8; 64];
        data[..5].copy_from_slice(b"Hello");
        let mut s = String::new();
        write_hexdump(&mut s, &data, 0x200).unwrap();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(
            lines[0],
            "00000200  48 65 6c 6c 6f 00 00 00  00 00 00 00 00 00 00 00  |Hello...........|"
        );
        assert_eq!(
            lines[1],
            "00000210  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00  |................|"
        );
        assert_eq!(lines[2], "*");
        assert_eq!(lines[3], "00000240");
    }
}

//! A strict parser for Structured Field Dictionaries (RFC 8941 section
//! 4.2.2), just enough for targeted cache-control fields (RFC 9213): it
//! reads every member type so that a valid field is accepted, keeps the
//! types that carry cache directives and drops parameters. Any syntax error
//! fails the whole field, which RFC 9213 section 2.2 then ignores.

/// A member value, reduced to what cache directives can use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Item {
    Boolean(bool),
    Integer(i64),
    String(Vec<u8>),
    Token(Vec<u8>),
    /// A decimal, byte sequence or inner list: valid syntax, but no cache
    /// directive takes one.
    Other,
}

/// Parses a dictionary. Keys are returned in first-seen order; a repeated
/// key takes the last value (RFC 8941 section 4.2.2).
pub(super) fn parse_dictionary(input: &[u8]) -> Option<Vec<(Vec<u8>, Item)>> {
    let mut parser = Parser { input, pos: 0 };
    parser.skip(|b| b == b' ');
    let end = input.iter().rposition(|&b| b != b' ').map_or(0, |i| i + 1);
    parser.input = input.get(..end).unwrap_or(&[]);
    let mut members: Vec<(Vec<u8>, Item)> = Vec::new();
    if parser.at_end() {
        return Some(members);
    }
    loop {
        let key = parser.key()?;
        let item = if parser.peek() == Some(b'=') {
            parser.pos += 1;
            if parser.peek() == Some(b'(') {
                parser.inner_list()?;
                Item::Other
            } else {
                parser.item()?
            }
        } else {
            parser.parameters()?;
            Item::Boolean(true)
        };
        match members.iter_mut().find(|(k, _)| *k == key) {
            Some(member) => member.1 = item,
            None => members.push((key, item)),
        }
        parser.skip(|b| b == b' ' || b == b'\t');
        if parser.at_end() {
            return Some(members);
        }
        if parser.peek() != Some(b',') {
            return None;
        }
        parser.pos += 1;
        parser.skip(|b| b == b' ' || b == b'\t');
        if parser.at_end() {
            // A trailing comma is an error in a structured field.
            return None;
        }
    }
}

struct Parser<'a> {
    input: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.input.len()
    }

    fn skip(&mut self, what: impl Fn(u8) -> bool) {
        while self.peek().is_some_and(&what) {
            self.pos += 1;
        }
    }

    /// Takes bytes while `what` holds and returns them.
    fn take(&mut self, what: impl Fn(u8) -> bool) -> Vec<u8> {
        let start = self.pos;
        self.skip(what);
        self.input.get(start..self.pos).unwrap_or(&[]).to_vec()
    }

    /// `key = ( lcalpha / "*" ) *( lcalpha / DIGIT / "_" / "-" / "." / "*" )`
    fn key(&mut self) -> Option<Vec<u8>> {
        let first = self.peek()?;
        if !(first.is_ascii_lowercase() || first == b'*') {
            return None;
        }
        Some(self.take(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.*".contains(&b)))
    }

    /// A bare item followed by parameters.
    fn item(&mut self) -> Option<Item> {
        let item = self.bare_item()?;
        self.parameters()?;
        Some(item)
    }

    fn bare_item(&mut self) -> Option<Item> {
        match self.peek()? {
            b'-' | b'0'..=b'9' => self.number(),
            b'"' => self.string(),
            b'*' | b'a'..=b'z' | b'A'..=b'Z' => {
                Some(Item::Token(self.take(|b| super::is_tchar(b) || b == b':' || b == b'/')))
            }
            b':' => {
                self.pos += 1;
                self.skip(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
                (self.peek() == Some(b':')).then(|| {
                    self.pos += 1;
                    Item::Other
                })
            }
            b'?' => {
                self.pos += 1;
                let value = match self.peek()? {
                    b'0' => false,
                    b'1' => true,
                    _ => return None,
                };
                self.pos += 1;
                Some(Item::Boolean(value))
            }
            _ => None,
        }
    }

    /// Integer (at most 15 digits) or decimal (at most 12 integer and 3
    /// fractional digits), RFC 8941 section 4.2.4.
    fn number(&mut self) -> Option<Item> {
        let negative = self.peek() == Some(b'-');
        if negative {
            self.pos += 1;
        }
        let digits = self.take(|b| b.is_ascii_digit());
        if digits.is_empty() || digits.len() > 15 {
            return None;
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            let fraction = self.take(|b| b.is_ascii_digit());
            if digits.len() > 12 || fraction.is_empty() || fraction.len() > 3 {
                return None;
            }
            return Some(Item::Other);
        }
        let mut value: i64 = 0;
        for digit in digits {
            // 15 digits always fit an i64, so this never saturates.
            value = value.saturating_mul(10).saturating_add(i64::from(digit - b'0'));
        }
        Some(Item::Integer(if negative { -value } else { value }))
    }

    /// String: printable ASCII, `\` only before `"` or `\` (section 4.2.5).
    fn string(&mut self) -> Option<Item> {
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            let byte = self.peek()?;
            self.pos += 1;
            match byte {
                b'"' => return Some(Item::String(out)),
                b'\\' => {
                    let escaped = self.peek()?;
                    if escaped != b'"' && escaped != b'\\' {
                        return None;
                    }
                    self.pos += 1;
                    out.push(escaped);
                }
                0x20..=0x7e => out.push(byte),
                _ => return None,
            }
        }
    }

    /// `*( ";" *SP key [ "=" bare-item ] )`, values discarded.
    fn parameters(&mut self) -> Option<()> {
        while self.peek() == Some(b';') {
            self.pos += 1;
            self.skip(|b| b == b' ');
            self.key()?;
            if self.peek() == Some(b'=') {
                self.pos += 1;
                self.bare_item()?;
            }
        }
        Some(())
    }

    /// `"(" *SP [ item *( 1*SP item ) *SP ] ")" parameters`, discarded.
    fn inner_list(&mut self) -> Option<()> {
        self.pos += 1;
        loop {
            self.skip(|b| b == b' ');
            if self.peek()? == b')' {
                self.pos += 1;
                return self.parameters();
            }
            self.item()?;
            match self.peek()? {
                b' ' | b')' => {}
                _ => return None,
            }
        }
    }
}

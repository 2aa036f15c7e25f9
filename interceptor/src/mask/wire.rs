//! Bounds-checked parsing of the backend message bodies masking reads (no type byte, no length
//! word: the relay has already split the frame). Every read checks the remaining length, so a
//! malformed body becomes a [`MaskError`], never a panic.

use super::MaskError;

/// A cursor over one message body.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    message: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], message: &'static str) -> Self {
        Reader {
            buf,
            pos: 0,
            message,
        }
    }

    fn err(&self, reason: &'static str) -> MaskError {
        MaskError::malformed(self.message, reason)
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], MaskError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.buf.len())
            .ok_or_else(|| self.err("truncated"))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], MaskError> {
        let bytes = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, MaskError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn i16(&mut self) -> Result<i16, MaskError> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    pub(crate) fn i32(&mut self) -> Result<i32, MaskError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, MaskError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// A NUL-terminated string, without its terminator.
    pub(crate) fn cstr(&mut self) -> Result<&'a [u8], MaskError> {
        let rest = &self.buf[self.pos..];
        let nul = memchr::memchr(0, rest).ok_or_else(|| self.err("unterminated string"))?;
        let out = &rest[..nul];
        self.pos += nul + 1;
        Ok(out)
    }

    /// A length-prefixed value as in DataRow and binary COPY: `None` for SQL NULL (-1).
    pub(crate) fn value(&mut self) -> Result<Option<&'a [u8]>, MaskError> {
        match self.i32()? {
            -1 => Ok(None),
            n if n < 0 => Err(self.err("negative field length")),
            n => Ok(Some(self.take(n as usize)?)),
        }
    }

    pub(crate) fn finish(&self) -> Result<(), MaskError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(self.err("trailing bytes"))
        }
    }
}

/// Wire format of a column's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Text,
    Binary,
}

impl Format {
    pub(crate) fn from_code(code: i16, message: &'static str) -> Result<Format, MaskError> {
        match code {
            0 => Ok(Format::Text),
            1 => Ok(Format::Binary),
            _ => Err(MaskError::malformed(message, "unknown format code")),
        }
    }
}

/// One field of a RowDescription.
#[derive(Debug, Clone)]
pub(crate) struct FieldDescription {
    pub name: String,
    pub table_oid: u32,
    pub attnum: i16,
    pub type_oid: u32,
    pub format: Format,
}

#[cfg(test)]
thread_local! {
    /// RowDescriptions decoded on this thread (tests count them per message).
    static ROW_DESCRIPTIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many RowDescriptions this thread has decoded.
#[cfg(test)]
pub(crate) fn row_descriptions_decoded() -> usize {
    ROW_DESCRIPTIONS.with(|n| n.get())
}

pub(crate) fn parse_row_description(body: &[u8]) -> Result<Vec<FieldDescription>, MaskError> {
    #[cfg(test)]
    ROW_DESCRIPTIONS.with(|n| n.set(n.get() + 1));
    const MSG: &str = "RowDescription";
    let mut r = Reader::new(body, MSG);
    let count = r.i16()?;
    if count < 0 {
        return Err(MaskError::malformed(MSG, "negative field count"));
    }
    let mut fields = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let name = String::from_utf8_lossy(r.cstr()?).into_owned();
        let table_oid = r.u32()?;
        let attnum = r.i16()?;
        let type_oid = r.u32()?;
        let _typlen = r.i16()?;
        let _typmod = r.i32()?;
        let format = Format::from_code(r.i16()?, MSG)?;
        fields.push(FieldDescription {
            name,
            table_oid,
            attnum,
            type_oid,
            format,
        });
    }
    r.finish()?;
    Ok(fields)
}

/// Append a length-prefixed value (or NULL) as DataRow and binary COPY encode it.
pub(crate) fn put_value(out: &mut Vec<u8>, value: Option<&[u8]>) -> Result<(), MaskError> {
    match value {
        None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        Some(v) => {
            let len = i32::try_from(v.len())
                .map_err(|_| MaskError::malformed("DataRow", "masked value too long"))?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(v);
        }
    }
    Ok(())
}

//! The byte encoding of a snapshot's state: little-endian integers, length-prefixed byte
//! strings and lists, and KVM structures as their raw bytes. Decoding checks every length
//! against what is left and what the type allows, so a hostile file yields an error, never a
//! panic or an allocation larger than the file.

use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Appends values to a byte buffer.
#[derive(Default)]
pub(crate) struct Encoder(pub Vec<u8>);

impl Encoder {
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    pub fn bool(&mut self, v: bool) {
        self.u8(v.into());
    }

    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    /// A length (u32) then the bytes.
    pub fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }

    pub fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    /// A KVM structure as its bytes (its size first, so that a layout change is caught).
    pub fn pod<T: IntoBytes + Immutable>(&mut self, v: &T) {
        self.bytes(v.as_bytes());
    }

    /// A count (u32), then each item.
    pub fn list<T>(&mut self, items: &[T], mut f: impl FnMut(&mut Self, &T)) {
        self.u32(items.len() as u32);
        for i in items {
            f(self, i);
        }
    }

    pub fn option<T>(&mut self, v: Option<&T>, f: impl FnOnce(&mut Self, &T)) {
        match v {
            Some(v) => {
                self.u8(1);
                f(self, v);
            }
            None => self.u8(0),
        }
    }
}

/// Why a state could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct DecodeError(pub String);

pub(crate) type Decoded<T> = Result<T, DecodeError>;

/// Reads values back, refusing anything that does not fit.
pub(crate) struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn take(&mut self, n: usize, what: &str) -> Decoded<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| DecodeError(format!("truncated at {what}")))?;
        let b = &self.buf[self.pos..end];
        self.pos = end;
        Ok(b)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Decoded<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    pub fn u8(&mut self, what: &str) -> Decoded<u8> {
        Ok(self.array::<1>(what)?[0])
    }

    pub fn bool(&mut self, what: &str) -> Decoded<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError(format!("{what}: {v} is not a boolean"))),
        }
    }

    pub fn u16(&mut self, what: &str) -> Decoded<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub fn u32(&mut self, what: &str) -> Decoded<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub fn u64(&mut self, what: &str) -> Decoded<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    pub fn bytes(&mut self, what: &str) -> Decoded<&'a [u8]> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }

    pub fn string(&mut self, what: &str) -> Decoded<String> {
        let b = self.bytes(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError(format!("{what}: not UTF-8")))
    }

    pub fn pod<T: FromBytes>(&mut self, what: &str) -> Decoded<T> {
        let b = self.bytes(what)?;
        T::read_from_bytes(b).map_err(|_| {
            DecodeError(format!(
                "{what}: {} bytes where {} were expected",
                b.len(),
                std::mem::size_of::<T>()
            ))
        })
    }

    /// A list of at most `max` items.
    pub fn list<T>(
        &mut self,
        what: &str,
        max: usize,
        mut f: impl FnMut(&mut Self) -> Decoded<T>,
    ) -> Decoded<Vec<T>> {
        let n = self.u32(what)? as usize;
        if n > max {
            return Err(DecodeError(format!("{what}: {n} items, at most {max}")));
        }
        (0..n).map(|_| f(self)).collect()
    }

    pub fn option<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Self) -> Decoded<T>,
    ) -> Decoded<Option<T>> {
        Ok(if self.bool(what)? {
            Some(f(self)?)
        } else {
            None
        })
    }

    /// Fails unless every byte was read.
    pub fn finish(&self) -> Decoded<()> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(DecodeError(format!(
                "{} bytes left over after the state",
                self.buf.len() - self.pos
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let mut e = Encoder::default();
        e.u8(7);
        e.bool(true);
        e.u64(u64::MAX - 1);
        e.str("kiln");
        e.pod(&kvm_bindings::kvm_regs {
            rip: 0x1234,
            ..Default::default()
        });
        e.list(&[1u16, 2, 3], |e, v| e.u16(*v));
        e.option(Some(&9u32), |e, v| e.u32(*v));
        let b = e.0;
        let mut d = Decoder::new(&b);
        assert_eq!(d.u8("a").unwrap(), 7);
        assert!(d.bool("b").unwrap());
        assert_eq!(d.u64("c").unwrap(), u64::MAX - 1);
        assert_eq!(d.string("d").unwrap(), "kiln");
        assert_eq!(d.pod::<kvm_bindings::kvm_regs>("e").unwrap().rip, 0x1234);
        assert_eq!(d.list("f", 3, |d| d.u16("f")).unwrap(), vec![1, 2, 3]);
        assert_eq!(d.option("g", |d| d.u32("g")).unwrap(), Some(9));
        d.finish().unwrap();
        // Every truncation is an error, never a panic.
        for n in 0..b.len() {
            let mut d = Decoder::new(&b[..n]);
            let r = (|| {
                d.u8("a")?;
                d.bool("b")?;
                d.u64("c")?;
                d.string("d")?;
                d.pod::<kvm_bindings::kvm_regs>("e")?;
                d.list("f", 3, |d| d.u16("f"))?;
                d.option("g", |d| d.u32("g"))
            })();
            assert!(r.is_err(), "{n} bytes decoded");
        }
        // A list longer than allowed, a wrong-sized structure.
        assert!(Decoder::new(&b[..]).list("x", 2, |d| d.u8("x")).is_err());
        let mut e = Encoder::default();
        e.bytes(&[0; 3]);
        assert!(Decoder::new(&e.0)
            .pod::<kvm_bindings::kvm_regs>("r")
            .is_err());
    }
}

//! The CMOS RTC: wall-clock time from the host and 128 bytes of NVRAM. The NVRAM is shared
//! with the VM owner so that it survives the guest's reboots, as battery-backed CMOS does.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::lock;
use crate::BusDevice;

/// Battery-backed CMOS memory, kept by the VM across in-place reboots.
pub type Nvram = Arc<Mutex<[u8; 128]>>;

const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_C: u8 = 0x0c;
const REG_STATUS_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// The RTC on ports 0x70 (index) and 0x71 (data).
pub struct Cmos {
    index: u8,
    nvram: Nvram,
}

impl Cmos {
    /// An RTC over `nvram`.
    pub fn new(nvram: Nvram) -> Self {
        Self { index: 0, nvram }
    }

    /// The index register (the NVRAM itself is the owner's), for a snapshot.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Puts back the index register of a snapshot (bit 7, the NMI mask, is dropped).
    pub fn set_index(&mut self, index: u8) {
        self.index = index & 0x7f;
    }

    fn time_register(reg: u8) -> Option<u8> {
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
        let (y, m, d) = civil_from_days((secs / 86400) as i64);
        let tod = secs % 86400;
        let bcd = |v: u64| (((v / 10) << 4) | (v % 10)) as u8;
        Some(match reg {
            0x00 => bcd(tod % 60),
            0x02 => bcd(tod / 60 % 60),
            0x04 => bcd(tod / 3600),
            0x06 => bcd(((secs / 86400 + 4) % 7) + 1), // 1970-01-01 was a Thursday
            0x07 => bcd(d),
            0x08 => bcd(m),
            0x09 => bcd(y % 100),
            REG_CENTURY => bcd(y / 100),
            REG_STATUS_A => 0x26, // 32.768 kHz base, 1024 Hz rate, no update in progress
            REG_STATUS_B => 0x02, // 24-hour mode, BCD
            REG_STATUS_C => 0,
            REG_STATUS_D => 0x80, // valid RAM and time
            _ => return None,
        })
    }
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(days: i64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as u64, m as u64, d as u64)
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (0, 1) => self.index,
            (1, 1) => Self::time_register(self.index)
                .unwrap_or_else(|| lock(&self.nvram)[self.index as usize]),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            // Bit 7 of the index is the NMI mask.
            (0, [v]) => self.index = v & 0x7f,
            (1, [v]) if Self::time_register(self.index).is_none() => {
                lock(&self.nvram)[self.index as usize] = *v;
            }
            _ => {} // The clock is the host's: writes to it are ignored.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvram_is_shared_and_time_registers_are_bcd() {
        let nv: Nvram = Arc::new(Mutex::new([0; 128]));
        let mut c = Cmos::new(nv.clone());
        c.write(0, &[0x80 | 0x38]);
        c.write(1, &[7]);
        assert_eq!(nv.lock().unwrap()[0x38], 7);
        let mut again = Cmos::new(nv);
        again.write(0, &[0x38]);
        let mut b = [0];
        again.read(1, &mut b);
        assert_eq!(b, [7]);
        for reg in [0u8, 2, 4, 7, 8, 9] {
            again.write(0, &[reg]);
            again.read(1, &mut b);
            assert!(b[0] & 0xf < 10 && b[0] >> 4 < 10, "register {reg} is BCD");
        }
        again.write(0, &[REG_CENTURY]);
        again.read(1, &mut b);
        assert_eq!(b, [0x20]);
    }

    #[test]
    fn calendar() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }
}

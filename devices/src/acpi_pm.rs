//! ACPI fixed hardware: the PM1a event block (status, enable), the PM1a control block and the
//! reset register. Power-off is an S5 sleep request; the power button is the fixed-feature one.

use std::sync::Arc;

use crate::{BusDevice, GuestRequest, Interrupt, RequestSink};

const SCI_EN: u16 = 1;
const PWRBTN: u16 = 1 << 8;
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 7 << SLP_TYP_SHIFT;

/// The PM1a registers, for a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AcpiPmState {
    /// PM1_STS.
    pub status: u16,
    /// PM1_EN.
    pub enable: u16,
    /// PM1_CNT (SLP_EN never set: it is an action, not a state).
    pub control: u16,
}

/// PM1a event (offsets 0–3) and control (offsets 4–5) registers, mapped contiguously.
pub struct AcpiPm {
    status: u16,
    enable: u16,
    control: u16,
    s5_type: u16,
    sci: Arc<dyn Interrupt>,
    requests: RequestSink,
}

impl AcpiPm {
    /// Length of the register block in I/O space.
    pub const LEN: u64 = 6;
    /// Offset of the control register within the block.
    pub const CONTROL_OFFSET: u64 = 4;

    /// Registers raising `sci`; `s5_type` is the SLP_TYP the DSDT's `\_S5_` declares.
    pub fn new(s5_type: u8, sci: Arc<dyn Interrupt>, requests: RequestSink) -> Self {
        Self {
            status: 0,
            enable: 0,
            control: SCI_EN,
            s5_type: s5_type.into(),
            sci,
            requests,
        }
    }

    /// True when the guest enabled the power button event (PWRBTN_EN): pressing the button
    /// reaches it.
    pub fn power_button_enabled(&self) -> bool {
        self.enable & PWRBTN != 0
    }

    /// The registers, for a snapshot.
    pub fn state(&self) -> AcpiPmState {
        AcpiPmState {
            status: self.status,
            enable: self.enable,
            control: self.control,
        }
    }

    /// Puts back the registers of a snapshot.
    pub fn restore(&mut self, state: AcpiPmState) {
        self.status = state.status;
        self.enable = state.enable;
        self.control = state.control & !SLP_EN;
    }

    /// Presses the power button: sets PWRBTN_STS and raises the SCI if the guest enabled it.
    pub fn press_power_button(&mut self) {
        self.status |= PWRBTN;
        if self.enable & PWRBTN != 0 {
            if let Err(e) = self.sci.trigger() {
                tracing::warn!("cannot raise the SCI: {e}");
            }
        }
    }

    fn regs(&self) -> [u8; 6] {
        let mut r = [0u8; 6];
        r[0..2].copy_from_slice(&self.status.to_le_bytes());
        r[2..4].copy_from_slice(&self.enable.to_le_bytes());
        r[4..6].copy_from_slice(&(self.control | SCI_EN).to_le_bytes());
        r
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let regs = self.regs();
        for (i, b) in data.iter_mut().enumerate() {
            *b = regs.get(offset as usize + i).copied().unwrap_or(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut regs = self.regs();
        let mut cleared = [0u8; 2];
        for (i, b) in data.iter().enumerate() {
            match offset as usize + i {
                // Status bits are write-one-to-clear.
                o @ 0..=1 => cleared[o] |= b,
                o @ 2..=5 => regs[o] = *b,
                _ => {}
            }
        }
        self.status &= !u16::from_le_bytes(cleared);
        self.enable = u16::from_le_bytes([regs[2], regs[3]]);
        let control = u16::from_le_bytes([regs[4], regs[5]]);
        self.control = control & !SLP_EN;
        let touched_control = offset + data.len() as u64 > Self::CONTROL_OFFSET;
        if touched_control && control & SLP_EN != 0 {
            let typ = (control & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
            if typ == self.s5_type {
                self.requests.request(GuestRequest::PowerOff, "ACPI S5");
            } else {
                tracing::debug!("guest asked for unsupported sleep type {typ}");
            }
        }
    }
}

/// The FADT reset register: a write with the reset bit (bit 2, as on port 0xCF9) resets.
pub struct ResetRegister {
    requests: RequestSink,
}

impl ResetRegister {
    /// A register whose resets go to `requests`.
    pub fn new(requests: RequestSink) -> Self {
        Self { requests }
    }
}

impl BusDevice for ResetRegister {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first().is_some_and(|v| v & 0x04 != 0) {
            self.requests
                .request(GuestRequest::Reset, "ACPI reset register");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GuestRequests;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Log(Mutex<Vec<GuestRequest>>, AtomicU32);
    impl GuestRequests for Log {
        fn request(&self, what: GuestRequest, _how: &'static str) {
            self.0.lock().unwrap().push(what);
        }
    }
    impl Interrupt for Log {
        fn trigger(&self) -> std::io::Result<()> {
            self.1.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn pm() -> (AcpiPm, Arc<Log>) {
        let log = Arc::new(Log::default());
        (AcpiPm::new(5, log.clone(), log.clone()), log)
    }

    #[test]
    fn s5_powers_off_other_sleep_types_do_not() {
        let (mut pm, log) = pm();
        pm.write(4, &((3 << 10) | SLP_EN).to_le_bytes());
        assert!(log.0.lock().unwrap().is_empty());
        pm.write(4, &((5 << 10) | SLP_EN).to_le_bytes());
        assert_eq!(*log.0.lock().unwrap(), vec![GuestRequest::PowerOff]);
        let mut c = [0u8; 2];
        pm.read(4, &mut c);
        assert_eq!(u16::from_le_bytes(c) & SLP_EN, 0, "SLP_EN reads as zero");
        assert_eq!(
            u16::from_le_bytes(c) & SCI_EN,
            SCI_EN,
            "always in ACPI mode"
        );
    }

    #[test]
    fn power_button_sets_status_raises_sci_when_enabled_and_clears_on_write() {
        let (mut pm, log) = pm();
        pm.press_power_button();
        assert_eq!(log.1.load(Ordering::SeqCst), 0, "not enabled yet");
        pm.write(2, &PWRBTN.to_le_bytes());
        pm.press_power_button();
        assert_eq!(log.1.load(Ordering::SeqCst), 1);
        let mut s = [0u8; 2];
        pm.read(0, &mut s);
        assert_eq!(u16::from_le_bytes(s), PWRBTN);
        pm.write(0, &PWRBTN.to_le_bytes());
        pm.read(0, &mut s);
        assert_eq!(u16::from_le_bytes(s), 0);
        // A 4-byte access across status and enable, and a stray access past the end.
        let mut all = [0u8; 4];
        pm.read(0, &mut all);
        assert_eq!(all, [0, 0, 0, 1]);
        let mut past = [0u8; 4];
        pm.read(4, &mut past);
        assert_eq!(&past[2..], &[0xff, 0xff]);
    }

    #[test]
    fn reset_register_needs_the_reset_bit() {
        let log = Arc::new(Log::default());
        let mut r = ResetRegister::new(log.clone());
        r.write(0, &[0x02]);
        assert!(log.0.lock().unwrap().is_empty());
        r.write(0, &[0x06]);
        assert_eq!(*log.0.lock().unwrap(), vec![GuestRequest::Reset]);
    }
}

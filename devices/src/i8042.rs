//! The i8042 keyboard controller, present for its reset line (command 0xFE on port 0x64).

use vm_superio::Trigger;

use crate::{BusDevice, GuestRequest, RequestSink};

/// Turns the controller's reset pulse into a guest reset request.
pub struct ResetLine(pub RequestSink);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(GuestRequest::Reset, "i8042 reset");
        Ok(())
    }
}

/// The controller on ports 0x60–0x64.
pub struct I8042(vm_superio::I8042Device<ResetLine>);

impl I8042 {
    /// A controller whose reset pulse goes to `requests`.
    pub fn new(requests: RequestSink) -> Self {
        Self(vm_superio::I8042Device::new(ResetLine(requests)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match data {
            [b] => *b = self.0.read(offset as u8),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [b] = data {
            if let Err(e) = self.0.write(offset as u8, *b) {
                tracing::debug!("i8042: {e:?}");
            }
        }
    }
}

//! The 8250 UART on COM1, on top of `vm-superio`.

use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::SerialEvents;
pub use vm_superio::serial::SerialState;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::{BusDevice, Interrupt};

/// Adapts an [`Interrupt`] to `vm-superio`'s trigger.
pub struct IrqLine(pub Arc<dyn Interrupt>);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger()
    }
}

/// Signals the owner's event loop when the guest has drained the receive FIFO, so that it
/// reads more input only when there is room for it.
pub struct InputRoom(pub EventFd);

impl SerialEvents for InputRoom {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

/// COM1: output to a sink the VM owner chooses, input from the owner.
pub struct Serial {
    uart: vm_superio::Serial<IrqLine, InputRoom, Box<dyn Write + Send>>,
}

impl Serial {
    /// A UART raising `irq`, writing to `out`, signalling `input_room` when its FIFO drains.
    pub fn new(irq: Arc<dyn Interrupt>, out: Box<dyn Write + Send>, input_room: EventFd) -> Self {
        Self {
            uart: vm_superio::Serial::with_events(IrqLine(irq), InputRoom(input_room), out),
        }
    }

    /// A UART as [`Serial::new`] makes, with the registers and receive FIFO of `state` (a
    /// snapshot's); an interrupt it shows pending is raised again. A FIFO longer than the
    /// UART's is refused.
    pub fn from_state(
        state: &SerialState,
        irq: Arc<dyn Interrupt>,
        out: Box<dyn Write + Send>,
        input_room: EventFd,
    ) -> Result<Self, String> {
        let uart = vm_superio::Serial::from_state(state, IrqLine(irq), InputRoom(input_room), out)
            .map_err(|e| format!("serial port state: {e:?}"))?;
        Ok(Self { uart })
    }

    /// The registers and receive FIFO, for a snapshot.
    pub fn state(&self) -> SerialState {
        self.uart.state()
    }

    /// Free space in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues bytes for the guest; returns how many fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.uart.fifo_capacity());
        if n == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..n]) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("serial input dropped: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match data {
            [b] if offset < 8 => *b = self.uart.read(offset as u8),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([b], true) = (data, offset < 8) {
            // An output sink that fails (a closed pipe) must not stop the guest.
            if let Err(e) = self.uart.write(offset as u8, *b) {
                tracing::trace!("serial write: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Count(AtomicU32);
    impl Interrupt for Count {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_the_sink_and_input_raises_the_irq() {
        let irq = Arc::new(Count::default());
        let sink = Sink::default();
        let room = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(
            irq.clone(),
            Box::new(sink.clone()),
            room.try_clone().unwrap(),
        );
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        s.write(1, &[1]); // IER: received-data interrupt
        assert_eq!(s.enqueue_input(b"ok"), 2);
        assert!(irq.0.load(Ordering::SeqCst) >= 1);
        let mut lsr = [0];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut b = [0];
        s.read(0, &mut b);
        assert_eq!(b, [b'o']);
        s.read(0, &mut b);
        assert_eq!(b, [b'k']);
        assert_eq!(
            room.read().unwrap(),
            1,
            "the owner hears that the FIFO drained"
        );
        // Multi-byte accesses are not UART accesses.
        let mut w = [0u8; 2];
        s.read(0, &mut w);
        assert_eq!(w, [0xff, 0xff]);
    }

    #[test]
    fn input_beyond_the_fifo_is_refused_not_lost_silently() {
        let room = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(Arc::new(Count::default()), Box::new(std::io::sink()), room);
        let cap = s.input_room();
        assert!(cap > 0);
        assert_eq!(s.enqueue_input(&vec![b'x'; cap + 10]), cap);
        assert_eq!(s.input_room(), 0);
        assert_eq!(s.enqueue_input(b"y"), 0);
    }
}

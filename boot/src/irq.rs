//! The machine's interrupt wiring, in one place: which IOAPIC pin each ISA IRQ reaches, and the
//! KVM GSI routing table that makes the in-kernel irqchip behave as the MADT and the MP table
//! announce.
//!
//! Kiln's devices raise interrupts by KVM GSI number (irqfds, and the in-kernel PIT, which always
//! raises GSI 0). GSIs 0–15 are the ISA IRQs and reach both 8259s and the IOAPIC; GSIs 16–23
//! reach only the IOAPIC (the virtio-mmio devices). As on real PCs, ISA IRQ0 (the timer) is
//! wired to IOAPIC pin 2, and IRQ2 is the PIC cascade, routed nowhere. KVM's default table maps
//! GSI n to pin n, so without this table a guest that believes the MADT programs pin 2 for the
//! timer and never sees a tick.

use kvm_bindings::{
    kvm_irq_routing_entry, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP,
};

/// Inputs of the IOAPIC (GSIs 0..24 in ACPI terms).
pub const IOAPIC_PINS: u32 = 24;
/// Number of ISA IRQs (both 8259s).
pub const ISA_IRQS: u8 = 16;
/// The ISA IRQ of the PIT.
pub const TIMER_IRQ: u8 = 0;
/// The ISA IRQ the slave 8259 cascades through; no device uses it.
pub const CASCADE_IRQ: u8 = 2;
/// IOAPIC pin the timer's IRQ0 is wired to.
const TIMER_PIN: u32 = 2;

/// The IOAPIC pin (ACPI GSI) that ISA IRQ `irq` reaches.
pub const fn isa_irq_pin(irq: u8) -> u32 {
    if irq == TIMER_IRQ {
        TIMER_PIN
    } else {
        irq as u32
    }
}

/// ISA IRQs whose IOAPIC pin differs from their number: the interrupt source overrides the MADT
/// must announce (besides those it adds for trigger mode and polarity).
pub fn isa_overrides() -> impl Iterator<Item = (u8, u32)> {
    (0..ISA_IRQS)
        .filter(|&irq| irq != CASCADE_IRQ && isa_irq_pin(irq) != u32::from(irq))
        .map(|irq| (irq, isa_irq_pin(irq)))
}

/// An interrupt controller input a GSI drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chip {
    /// The master 8259 (ISA IRQs 0–7).
    PicMaster,
    /// The slave 8259 (ISA IRQs 8–15).
    PicSlave,
    /// The IOAPIC.
    Ioapic,
}

/// One line of the routing table: raising `gsi` asserts `pin` of `chip`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The KVM GSI a device (or the in-kernel PIT) raises.
    pub gsi: u32,
    /// The controller it reaches.
    pub chip: Chip,
    /// The controller's input.
    pub pin: u32,
}

/// The machine's routing table: each ISA IRQ but the cascade to its 8259 input and to its
/// IOAPIC pin; GSIs 16–23 to the IOAPIC only.
pub fn routes() -> Vec<Route> {
    let mut routes = Vec::new();
    for irq in (0..ISA_IRQS).filter(|&i| i != CASCADE_IRQ) {
        let gsi = u32::from(irq);
        let (chip, pin) = if irq < 8 {
            (Chip::PicMaster, gsi)
        } else {
            (Chip::PicSlave, gsi - 8)
        };
        routes.push(Route { gsi, chip, pin });
        routes.push(Route {
            gsi,
            chip: Chip::Ioapic,
            pin: isa_irq_pin(irq),
        });
    }
    for gsi in u32::from(ISA_IRQS)..IOAPIC_PINS {
        routes.push(Route {
            gsi,
            chip: Chip::Ioapic,
            pin: gsi,
        });
    }
    routes
}

/// [`routes`] as KVM_SET_GSI_ROUTING entries (the whole table: it replaces KVM's default).
pub fn kvm_routes() -> Vec<kvm_irq_routing_entry> {
    routes()
        .into_iter()
        .map(|r| {
            let mut e = kvm_irq_routing_entry {
                gsi: r.gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = match r.chip {
                Chip::PicMaster => KVM_IRQCHIP_PIC_MASTER,
                Chip::PicSlave => KVM_IRQCHIP_PIC_SLAVE,
                Chip::Ioapic => KVM_IRQCHIP_IOAPIC,
            };
            e.u.irqchip.pin = r.pin;
            e
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi::{madt, AcpiConfig};

    fn ioapic_pin_of(gsi: u32) -> Option<u32> {
        let r: Vec<_> = routes()
            .into_iter()
            .filter(|r| r.gsi == gsi && r.chip == Chip::Ioapic)
            .map(|r| r.pin)
            .collect();
        assert!(r.len() <= 1, "GSI {gsi} reaches the IOAPIC twice");
        r.first().copied()
    }

    #[test]
    fn the_timer_reaches_pin_2_and_the_cascade_nothing() {
        assert_eq!(ioapic_pin_of(0), Some(2));
        assert_eq!(ioapic_pin_of(2), None);
        assert!(routes().iter().all(|r| r.gsi != 2));
        assert_eq!(kvm_routes().len(), routes().len());
        for gsi in (1..24).filter(|&g| g != 2) {
            assert_eq!(ioapic_pin_of(gsi), Some(gsi));
        }
        // No two GSIs drive the same IOAPIC pin.
        let mut pins: Vec<u32> = (0..24).filter_map(ioapic_pin_of).collect();
        pins.sort();
        pins.dedup();
        assert_eq!(pins.len(), 23);
    }

    #[test]
    fn madt_overrides_and_mp_table_agree_with_the_routing_table() {
        let cfg = AcpiConfig {
            vcpus: 2,
            pm1a_evt_port: 0x600,
            pm1a_cnt_port: 0x604,
            reset_port: 0xcf9,
            reset_value: 6,
            sci_irq: 9,
            serial_ports: vec![(0x3f8, 4)],
            rtc: Some((0x70, 8)),
            virtio_mmio: vec![],
        };
        // MADT: walk the entries after the 8-byte header (LAPIC address, flags).
        let m = madt(&cfg);
        let bytes = m.as_slice();
        let mut overrides = std::collections::HashMap::new();
        let mut off = 36 + 8;
        while off < bytes.len() {
            let (kind, len) = (bytes[off], bytes[off + 1] as usize);
            if kind == 2 {
                let source = bytes[off + 3];
                let gsi = u32::from_le_bytes(bytes[off + 4..off + 8].try_into().unwrap());
                assert!(overrides.insert(source, gsi).is_none(), "IRQ{source} twice");
            }
            off += len;
        }
        for irq in (0..ISA_IRQS).filter(|&i| i != CASCADE_IRQ) {
            // What the guest believes from the MADT: an override, else identity.
            let madt_gsi = overrides.get(&irq).copied().unwrap_or(u32::from(irq));
            assert_eq!(Some(madt_gsi), ioapic_pin_of(irq.into()), "MADT, IRQ{irq}");
        }
        // MP table: I/O interrupt entries (type 3) name the source IRQ and the IOAPIC pin.
        let mp = crate::mptable::build(2);
        let t = &mp[16..];
        let mut off = 44;
        let mut seen = 0;
        while off < t.len() {
            if t[off] == 3 {
                let (irq, pin) = (t[off + 5], u32::from(t[off + 7]));
                if irq != CASCADE_IRQ {
                    assert_eq!(Some(pin), ioapic_pin_of(irq.into()), "MP table, IRQ{irq}");
                }
                seen += 1;
            }
            off += if t[off] == 0 { 20 } else { 8 };
        }
        assert_eq!(seen, ISA_IRQS as usize - 1);
    }
}

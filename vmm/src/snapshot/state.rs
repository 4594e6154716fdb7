//! What a snapshot's state file holds, and its encoding (see the module above for the layout).

use std::path::PathBuf;

use devices::acpi_pm::AcpiPmState;
use devices::serial::SerialState;
use devices::virtio::mmio::TransportState;
use devices::virtio::QueueState;
use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_MAX_CPUID_ENTRIES};

use super::codec::{DecodeError, Decoded, Decoder, Encoder};
use crate::config::{DiskConfig, KernelImage, MacAddr, NetConfig, VmConfig, MAX_VIRTIO_DEVICES};
use crate::cpu_state::VcpuState;

/// Most MSRs one vCPU may carry in a snapshot (KVM lists a few hundred at most).
const MAX_MSRS: usize = 4096;
/// Most guest RAM regions (Kiln makes one or two).
const MAX_REGIONS: usize = 8;
/// Most queues a virtio device may have.
const MAX_QUEUES: usize = 16;

/// KVM's VM-wide state: the in-kernel PIT (when the VM has one), irqchips and kvmclock.
#[derive(Clone)]
pub(crate) struct KvmVmState {
    pub pit: Option<kvm_pit_state2>,
    pub clock: kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

/// One virtio device: its transport, and its live queues when the driver had started it.
#[derive(Clone)]
pub(crate) struct VirtioState {
    pub transport: TransportState,
    pub active: Option<Vec<QueueState>>,
}

/// The copy of one disk kept in the snapshot directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DiskCopy {
    /// File name inside the snapshot directory.
    pub file: String,
    pub format: images::Format,
}

/// Everything a snapshot holds but guest memory.
pub(crate) struct MachineState {
    /// The VM's configuration at the time (host side: kernel, disk paths, TAPs, MACs).
    pub config: VmConfig,
    /// Guest RAM regions (guest-physical start, length), stored one after the other in the
    /// memory file.
    pub regions: Vec<(u64, u64)>,
    /// One per disk of `config`, in order.
    pub disks: Vec<DiskCopy>,
    pub vm: KvmVmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialState,
    pub cmos_index: u8,
    pub nvram: [u8; 128],
    pub acpi_pm: AcpiPmState,
    /// Disks then NICs, as in `config`.
    pub virtio: Vec<VirtioState>,
}

fn bad(what: &str) -> DecodeError {
    DecodeError(what.to_string())
}

fn put_config(e: &mut Encoder, c: &VmConfig) {
    e.u8(c.vcpus);
    e.u64(c.memory);
    match &c.kernel {
        KernelImage::File(p) => {
            e.u8(0);
            e.str(&p.to_string_lossy());
        }
        KernelImage::Bytes(b) => {
            e.u8(1);
            e.bytes(b);
        }
    }
    e.option(c.initrd.as_ref(), |e, p| e.str(&p.to_string_lossy()));
    e.str(&c.cmdline);
    e.list(&c.disks, |e, d| {
        e.str(&d.path.to_string_lossy());
        e.bool(d.read_only);
        e.str(&d.serial);
        e.list(&d.backing_dirs, |e, p| e.str(&p.to_string_lossy()));
        e.u32(d.block_size);
    });
    e.list(&c.nets, |e, n| {
        e.str(&n.tap);
        e.0.extend_from_slice(&n.mac.octets());
    });
    e.bool(c.pit);
}

fn get_config(d: &mut Decoder) -> Decoded<VmConfig> {
    let vcpus = d.u8("vCPU count")?;
    let memory = d.u64("memory size")?;
    let kernel = match d.u8("kernel kind")? {
        0 => KernelImage::File(PathBuf::from(d.string("kernel path")?)),
        1 => KernelImage::Bytes(bytes::Bytes::copy_from_slice(d.bytes("kernel image")?)),
        k => return Err(DecodeError(format!("unknown kernel kind {k}"))),
    };
    let initrd = d.option("initrd", |d| Ok(PathBuf::from(d.string("initrd path")?)))?;
    let cmdline = d.string("command line")?;
    let disks = d.list("disks", MAX_VIRTIO_DEVICES, |d| {
        Ok(DiskConfig {
            path: PathBuf::from(d.string("disk path")?),
            read_only: d.bool("disk read-only flag")?,
            serial: d.string("disk serial")?,
            backing_dirs: d.list("backing directories", 64, |d| {
                Ok(PathBuf::from(d.string("backing directory")?))
            })?,
            block_size: d.u32("disk block size")?,
        })
    })?;
    let nets = d.list("NICs", MAX_VIRTIO_DEVICES, |d| {
        let tap = d.string("TAP name")?;
        let mut mac = [0u8; 6];
        for b in &mut mac {
            *b = d.u8("MAC")?;
        }
        let mac = MacAddr::from_octets(mac)
            .ok_or_else(|| DecodeError("a multicast MAC cannot be a NIC's".into()))?;
        Ok(NetConfig { tap, mac })
    })?;
    let pit = d.bool("PIT flag")?;
    Ok(VmConfig {
        vcpus,
        memory,
        kernel,
        initrd,
        cmdline,
        disks,
        nets,
        pit,
    })
}

fn put_vcpu(e: &mut Encoder, v: &VcpuState) {
    e.list(&v.cpuid, |e, c| e.pod(c));
    e.list(&v.msrs, |e, m| e.pod(m));
    e.pod(&v.regs);
    e.pod(&v.sregs);
    e.pod(&v.xsave);
    e.option(v.xcrs.as_ref(), |e, x| e.pod(x));
    e.pod(&v.debugregs);
    e.pod(&v.lapic);
    e.pod(&v.mp_state);
    e.pod(&v.events);
    e.option(v.tsc_khz.as_ref(), |e, k| e.u32(*k));
}

fn get_vcpu(d: &mut Decoder) -> Decoded<VcpuState> {
    Ok(VcpuState {
        cpuid: d.list("CPUID", KVM_MAX_CPUID_ENTRIES, |d| d.pod("CPUID entry"))?,
        msrs: d.list("MSRs", MAX_MSRS, |d| d.pod("MSR"))?,
        regs: d.pod("registers")?,
        sregs: d.pod("special registers")?,
        xsave: d.pod("XSAVE area")?,
        xcrs: d.option("XCRs", |d| d.pod("XCRs"))?,
        debugregs: d.pod("debug registers")?,
        lapic: d.pod("LAPIC")?,
        mp_state: d.pod("MP state")?,
        events: d.pod("vCPU events")?,
        tsc_khz: d.option("TSC frequency", |d| d.u32("TSC frequency"))?,
    })
}

fn put_queue(e: &mut Encoder, q: &QueueState) {
    e.u16(q.max_size);
    e.u16(q.next_avail);
    e.u16(q.next_used);
    e.bool(q.event_idx_enabled);
    e.u16(q.size);
    e.bool(q.ready);
    e.u64(q.desc_table);
    e.u64(q.avail_ring);
    e.u64(q.used_ring);
}

fn get_queue(d: &mut Decoder) -> Decoded<QueueState> {
    Ok(QueueState {
        max_size: d.u16("queue")?,
        next_avail: d.u16("queue")?,
        next_used: d.u16("queue")?,
        event_idx_enabled: d.bool("queue")?,
        size: d.u16("queue")?,
        ready: d.bool("queue")?,
        desc_table: d.u64("queue")?,
        avail_ring: d.u64("queue")?,
        used_ring: d.u64("queue")?,
    })
}

fn put_virtio(e: &mut Encoder, v: &VirtioState) {
    let t = &v.transport;
    e.u32(t.status);
    e.u64(t.driver_features);
    e.u32(t.device_features_sel);
    e.u32(t.driver_features_sel);
    e.u32(t.queue_sel);
    e.u32(t.config_generation);
    e.u32(t.interrupt_status);
    e.bool(t.broken);
    e.list(&t.queues, put_queue);
    e.option(v.active.as_ref(), |e, qs| e.list(qs, put_queue));
}

fn get_virtio(d: &mut Decoder) -> Decoded<VirtioState> {
    let transport = TransportState {
        status: d.u32("virtio status")?,
        driver_features: d.u64("virtio features")?,
        device_features_sel: d.u32("virtio register")?,
        driver_features_sel: d.u32("virtio register")?,
        queue_sel: d.u32("virtio register")?,
        config_generation: d.u32("virtio register")?,
        interrupt_status: d.u32("virtio interrupt status")?,
        broken: d.bool("virtio broken flag")?,
        queues: d.list("virtio queues", MAX_QUEUES, get_queue)?,
    };
    let active = d.option("active queues", |d| {
        d.list("virtio queues", MAX_QUEUES, get_queue)
    })?;
    Ok(VirtioState { transport, active })
}

fn put_serial(e: &mut Encoder, s: &SerialState) {
    for b in [
        s.baud_divisor_low,
        s.baud_divisor_high,
        s.interrupt_enable,
        s.interrupt_identification,
        s.line_control,
        s.line_status,
        s.modem_control,
        s.modem_status,
        s.scratch,
    ] {
        e.u8(b);
    }
    e.bytes(&s.in_buffer);
}

fn get_serial(d: &mut Decoder) -> Decoded<SerialState> {
    let mut r = [0u8; 9];
    for b in &mut r {
        *b = d.u8("serial port")?;
    }
    Ok(SerialState {
        baud_divisor_low: r[0],
        baud_divisor_high: r[1],
        interrupt_enable: r[2],
        interrupt_identification: r[3],
        line_control: r[4],
        line_status: r[5],
        modem_control: r[6],
        modem_status: r[7],
        scratch: r[8],
        in_buffer: d.bytes("serial input FIFO")?.to_vec(),
    })
}

impl MachineState {
    /// The state's bytes (the body of the state file).
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        put_config(&mut e, &self.config);
        e.list(&self.regions, |e, (gpa, len)| {
            e.u64(*gpa);
            e.u64(*len);
        });
        e.list(&self.disks, |e, d| {
            e.str(&d.file);
            e.str(d.format.name());
        });
        e.option(self.vm.pit.as_ref(), |e, p| e.pod(p));
        e.pod(&self.vm.clock);
        e.pod(&self.vm.pic_master);
        e.pod(&self.vm.pic_slave);
        e.pod(&self.vm.ioapic);
        e.list(&self.vcpus, put_vcpu);
        put_serial(&mut e, &self.serial);
        e.u8(self.cmos_index);
        e.0.extend_from_slice(&self.nvram);
        e.u16(self.acpi_pm.status);
        e.u16(self.acpi_pm.enable);
        e.u16(self.acpi_pm.control);
        e.list(&self.virtio, put_virtio);
        e.0
    }

    /// Decodes and checks a state: every length, and that its parts agree with each other
    /// (one vCPU state per vCPU, one device state per disk and NIC, RAM regions as Kiln
    /// lays them out for that memory size). It says nothing yet about whether KVM accepts it.
    pub fn decode(buf: &[u8]) -> Decoded<Self> {
        let mut d = Decoder::new(buf);
        let config = get_config(&mut d)?;
        let regions = d.list("memory regions", MAX_REGIONS, |d| {
            Ok((d.u64("region start")?, d.u64("region length")?))
        })?;
        let disks = d.list("disk copies", MAX_VIRTIO_DEVICES, |d| {
            let file = d.string("disk copy name")?;
            let format = d.string("disk copy format")?;
            let format = images::Format::from_name(&format)
                .ok_or_else(|| DecodeError(format!("unknown disk format {format:?}")))?;
            // A plain name inside the directory, never a path out of it.
            if file.is_empty() || file.contains('/') || file.starts_with('.') {
                return Err(DecodeError(format!("bad disk copy name {file:?}")));
            }
            Ok(DiskCopy { file, format })
        })?;
        let vm = KvmVmState {
            pit: d.option("PIT", |d| d.pod("PIT"))?,
            clock: d.pod("kvmclock")?,
            pic_master: d.pod("PIC master")?,
            pic_slave: d.pod("PIC slave")?,
            ioapic: d.pod("IOAPIC")?,
        };
        let vcpus = d.list("vCPUs", 255, get_vcpu)?;
        let serial = get_serial(&mut d)?;
        let cmos_index = d.u8("CMOS index")?;
        let mut nvram = [0u8; 128];
        for b in &mut nvram {
            *b = d.u8("CMOS NVRAM")?;
        }
        let acpi_pm = AcpiPmState {
            status: d.u16("ACPI PM1 status")?,
            enable: d.u16("ACPI PM1 enable")?,
            control: d.u16("ACPI PM1 control")?,
        };
        let virtio = d.list("virtio devices", MAX_VIRTIO_DEVICES, get_virtio)?;
        d.finish()?;

        let want_regions: Vec<(u64, u64)> = boot::layout::ram_regions(config.memory)
            .iter()
            .map(|(a, l)| (a.0, *l as u64))
            .collect();
        if regions != want_regions {
            return Err(bad("the memory regions do not match the memory size"));
        }
        if vcpus.len() != usize::from(config.vcpus) || vcpus.is_empty() {
            return Err(bad("the vCPU states do not match the vCPU count"));
        }
        if vm.pit.is_some() != config.pit {
            return Err(bad("the PIT state does not match the configuration"));
        }
        if disks.len() != config.disks.len() {
            return Err(bad("the disk copies do not match the disks"));
        }
        if virtio.len() != config.disks.len() + config.nets.len() {
            return Err(bad("the device states do not match the disks and NICs"));
        }
        for (v, i) in virtio.iter().zip(0..) {
            let want = if i < config.disks.len() { 1 } else { 2 };
            if v.transport.queues.len() != want
                || v.active.as_ref().is_some_and(|a| a.len() != want)
            {
                return Err(DecodeError(format!(
                    "device {i} has the wrong number of queues"
                )));
            }
        }
        Ok(Self {
            config,
            regions,
            disks,
            vm,
            vcpus,
            serial,
            cmos_index,
            nvram,
            acpi_pm,
            virtio,
        })
    }
}

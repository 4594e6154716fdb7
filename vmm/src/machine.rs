//! One boot of a VM: the KVM VM, guest memory with the kernel and boot tables, the devices,
//! the vCPU threads and the event loop. A guest reset drops it and builds the next one.

use std::fs::File;
use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boot::acpi::{AcpiConfig, S5_SLEEP_TYPE};
use boot::kernel::{BootEntry, LoadedKernel};
use boot::layout;
use boot::params::BootInfo;
use devices::acpi_pm::{AcpiPm, ResetRegister};
use devices::bus::lock;
use devices::cmos::{Cmos, Nvram};
use devices::i8042::I8042;
use devices::legacy;
use devices::serial::Serial;
use devices::virtio::block::Block;
use devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY};
use devices::virtio::net::Net;
use devices::virtio::tap::Tap;
use devices::virtio::{SharedVirtioDevice, VirtioEvents, VirtioInterrupt};
use devices::{Bus, RequestSink};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KvmIrqRouting, Msrs, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::config::{KernelImage, VmConfig};
use crate::cpu_state::VcpuState;
use crate::event_loop::{ConsoleInput, EventLoop};
use crate::host::Host;
use crate::shell::VmShell;
use crate::snapshot::state::MachineState;
use crate::snapshot::{self, PreparedVm, Restore};
use crate::vcpu::{self, Buses};
use crate::vm::{BootControl, SharedWriter, VmError};

/// TSS and identity-map pages KVM needs below 4 GiB (Intel), inside the MMIO gap.
const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// What survives a guest reset: the console and the CMOS NVRAM.
pub(crate) struct Persistent {
    pub output: SharedWriter,
    pub input: Option<File>,
    pub nvram: Nvram,
}

/// A running boot. Its vCPU threads are kept by its [`BootControl`].
pub(crate) struct Machine {
    events: Option<EventLoop>,
    control: Arc<BootControl>,
    // Kept alive until the vCPU threads are gone.
    _parts: Arc<Parts>,
}

/// A boot's VM, memory and devices: what the owner reaches while it runs (power button,
/// counters, snapshots).
pub(crate) struct Parts {
    pub vm: VmFd,
    pub mem: GuestMemoryMmap,
    pub serial: Arc<Mutex<Serial>>,
    pub cmos: Arc<Mutex<Cmos>>,
    pub pm: Arc<Mutex<AcpiPm>>,
    /// The virtio devices (disks, then NICs) and their transports, in the same order.
    pub devices: Vec<SharedVirtioDevice>,
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl Parts {
    /// Guest RAM regions: (guest-physical start, length).
    pub fn mem_regions(&self) -> Vec<(u64, u64)> {
        self.mem
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect()
    }
}

fn build_err(what: &str) -> impl Fn(kvm_ioctls::Error) -> VmError + '_ {
    move |e| VmError::Build(format!("{what}: {e}"))
}

impl Machine {
    /// Builds the VM and starts its vCPUs: booting the kernel (in `shell` when given one that
    /// fits), or continuing the guest of `restore`.
    pub fn start(
        host: &Host,
        config: &VmConfig,
        persistent: &Persistent,
        control: Arc<BootControl>,
        restore: Option<Restore>,
        shell: Option<VmShell>,
    ) -> Result<Self, VmError> {
        install_kick_handler();
        let (vm, mem, snapshot) = match (restore, shell) {
            (Some(r), _) => {
                let p = match r {
                    Restore::Prepared(p) => p,
                    Restore::Snapshot(s) => PreparedVm::new(host, s)?,
                };
                (p.vm, p.mem, Some(p.snapshot))
            }
            (None, Some(s)) if s.fits(config) => (s.vm, s.mem, None),
            (None, _) => {
                let mem = guest_memory(config.memory)?;
                (create_vm(host, config.pit, &mem)?, mem, None)
            }
        };
        let saved = snapshot.as_deref().map(|s| &s.state);
        let entry = match saved {
            Some(_) => None,
            None => Some(load_guest(&mem, config)?.entry),
        };
        let requests: RequestSink = control.clone();
        let (pio, serial, room, pm, cmos) = legacy_devices(&vm, persistent, requests, saved)?;
        let (mmio, virtio, transports) = virtio_devices(&vm, &mem, config, saved)?;
        let vcpu_fds = (0..config.vcpus)
            .map(|id| match saved {
                Some(s) => restore_vcpu(&vm, id, &s.vcpus[usize::from(id)]),
                None => {
                    let entry = (id == 0).then_some(entry).flatten();
                    configure_vcpu(host, &vm, id, config.vcpus, entry)
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        tracing::debug!("guest loaded, devices and vCPUs configured");
        if let Some(s) = saved {
            snapshot::restore_vm_state(&vm, &s.vm)?;
        }
        let buses = Arc::new(Buses { pio, mmio });
        let parts = Arc::new(Parts {
            vm,
            mem,
            serial: serial.clone(),
            cmos,
            pm,
            devices: virtio.iter().map(|v| v.device()).collect(),
            transports,
        });
        *lock(&control.parts) = Some(parts.clone());

        let console = match &persistent.input {
            Some(f) => Some(ConsoleInput {
                input: f
                    .try_clone()
                    .map_err(|e| VmError::Build(format!("console input: {e}")))?,
                room,
                serial,
                watching: false,
                closed: false,
            }),
            None => None,
        };
        let events = EventLoop::start(console, virtio, control.clone())
            .map_err(|e| VmError::Build(format!("event loop: {e}")))?;

        let machine = Machine {
            events: Some(events),
            control: control.clone(),
            _parts: parts,
        };
        // The test hook of the sandbox (see `sandbox::test_forbidden_call`) runs only in VMs
        // whose command line asks for it.
        let selftest = config
            .cmdline
            .split_ascii_whitespace()
            .any(|w| w == "kiln.test-forbidden-syscall");
        let save = Arc::new(vcpu::SaveList {
            msrs: host.msrs.clone(),
            xcrs: host.kvm.check_extension(kvm_ioctls::Cap::Xcrs),
        });
        for (id, fd) in vcpu_fds.into_iter().enumerate() {
            let (buses, vcpu_control, save) = (buses.clone(), control.clone(), save.clone());
            let t = std::thread::Builder::new()
                .name(format!("kiln-vcpu{id}"))
                .spawn(move || {
                    let c = vcpu_control.clone();
                    if let Err(e) = crate::sandbox::apply(crate::sandbox::ThreadKind::Vcpu) {
                        c.finish(crate::vm::Outcome::Failed(format!("vCPU {id}: {e}")));
                        return;
                    }
                    if let Some(reason) =
                        selftest.then(crate::sandbox::test_forbidden_call).flatten()
                    {
                        tracing::error!(vcpu = id, "{reason}");
                        c.finish(crate::vm::Outcome::Failed(format!("vCPU {id}: {reason}")));
                        return;
                    }
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        vcpu::run(fd, id as u8, buses, vcpu_control, &save)
                    }));
                    if let Err(p) = r {
                        let msg = p
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| p.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        c.finish(crate::vm::Outcome::Failed(format!(
                            "vCPU {id} panicked: {msg}"
                        )));
                    }
                });
            match t {
                Ok(t) => control.add_vcpu(t),
                Err(e) => {
                    machine.stop();
                    return Err(VmError::Build(format!("cannot start a vCPU thread: {e}")));
                }
            }
        }
        Ok(machine)
    }

    /// Stops the vCPUs (kicking them out of `KVM_RUN`) and the event loop, and waits for them.
    pub fn stop(mut self) {
        self.control.end();
        // Kick until every vCPU thread is out; a thread is taken out of the boot before it is
        // joined, so no kick (of this loop or of a pause racing it) reaches a joined thread.
        loop {
            let (done, all) = self.control.reap_vcpus();
            for t in done {
                let _ = t.join();
            }
            if all {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        if let Some(e) = self.events.take() {
            e.stop();
        }
    }
}

/// Fresh guest RAM of `memory` bytes, laid out as Kiln's boot tables describe it.
pub(crate) fn guest_memory(memory: u64) -> Result<GuestMemoryMmap, VmError> {
    GuestMemoryMmap::<()>::from_ranges(&layout::ram_regions(memory))
        .map_err(|e| VmError::Build(format!("cannot allocate guest memory: {e}")))
}

/// Tells KVM where guest RAM is.
fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    let t = std::time::Instant::now();
    for (slot, region) in mem.iter().enumerate() {
        let host_addr = mem
            .get_host_address(region.start_addr())
            .map_err(|e| VmError::Build(format!("guest memory: {e}")))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host_addr as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by the Machine's `mem`, which outlives
        // the VM fd's use (the vCPU threads are joined before either is dropped).
        unsafe { vm.set_user_memory_region(r) }.map_err(build_err("memory region"))?;
    }
    tracing::debug!(
        us = t.elapsed().as_micros() as u64,
        "guest memory registered"
    );
    Ok(())
}

/// A KVM VM with guest RAM `mem` registered, the TSS, the in-kernel irqchip, Kiln's interrupt
/// routes, and with `pit` the in-kernel PIT.
///
/// The memory goes in before the irqchip: `KVM_CREATE_IRQCHIP` starts an SRCU grace period
/// (~16 ms on our hosts) that a memory slot added after it waits out (5–8 ms measured with
/// bare ioctls), against 0.1–0.2 ms before it. Closing a VM younger than that grace period
/// still waits for its end.
pub(crate) fn create_vm(host: &Host, pit: bool, mem: &GuestMemoryMmap) -> Result<VmFd, VmError> {
    let vm = loop {
        match host.kvm.create_vm() {
            Err(e) if e.errno() == libc::EINTR => continue,
            r => break r.map_err(build_err("KVM_CREATE_VM"))?,
        }
    };
    vm.set_tss_address(KVM_TSS_ADDR)
        .map_err(build_err("TSS address"))?;
    register_memory(&vm, mem)?;
    vm.create_irq_chip().map_err(build_err("irqchip"))?;
    let routes = KvmIrqRouting::from_entries(&boot::irq::kvm_routes())
        .map_err(|e| VmError::Build(format!("GSI routing: {e:?}")))?;
    vm.set_gsi_routing(&routes)
        .map_err(build_err("GSI routing"))?;
    if pit {
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(build_err("PIT"))?;
    }
    Ok(vm)
}

/// Loads the kernel, initrd, command line and every boot table.
fn load_guest(mem: &GuestMemoryMmap, config: &VmConfig) -> Result<LoadedKernel, VmError> {
    let kernel = match &config.kernel {
        KernelImage::File(path) => {
            let mut f = File::open(path)
                .map_err(|e| VmError::Build(format!("kernel {}: {e}", path.display())))?;
            boot::kernel::load_kernel(mem, &mut f)
        }
        KernelImage::Bytes(b) => boot::kernel::load_kernel(mem, &mut Cursor::new(&b[..])),
    }
    .map_err(|e| VmError::Build(format!("{}: {e}", config.kernel.describe())))?;

    let initrd = match &config.initrd {
        Some(path) => {
            let mut f = File::open(path)
                .map_err(|e| VmError::Build(format!("initrd {}: {e}", path.display())))?;
            let size = f
                .metadata()
                .map_err(|e| VmError::Build(format!("initrd {}: {e}", path.display())))?
                .len();
            let max = kernel
                .setup_header
                .map(|h| u64::from(h.initrd_addr_max))
                .filter(|&m| m != 0)
                .unwrap_or(u64::MAX);
            let addr = boot::kernel::initrd_address(config.memory, kernel.end, size, max)?;
            boot::kernel::load_initrd(mem, addr, &mut f, size)?;
            Some((addr, size))
        }
        None => None,
    };
    let cmdline_len = boot::params::write_cmdline(mem, &config.full_cmdline())?;
    let tables = boot::acpi::write_tables(mem, &acpi_config(config))?;
    boot::mptable::write(mem, config.vcpus)?;
    boot::cpu::write_boot_tables(mem)?;
    let info = BootInfo {
        mem_size: config.memory,
        cmdline_len,
        initrd,
        rsdp: tables.rsdp.0,
    };
    match kernel.entry {
        BootEntry::Pvh(_) => boot::params::write_pvh(mem, &info)?,
        BootEntry::Linux64(_) => boot::params::write_zero_page(mem, &info, kernel.setup_header)?,
    };
    Ok(kernel)
}

/// The platform the ACPI tables describe: the devices of [`legacy_devices`] and
/// [`virtio_devices`].
fn acpi_config(config: &VmConfig) -> AcpiConfig {
    AcpiConfig {
        vcpus: config.vcpus,
        pm1a_evt_port: legacy::PM1A_EVT,
        pm1a_cnt_port: legacy::PM1A_CNT,
        reset_port: legacy::RESET.0,
        reset_value: legacy::RESET.1,
        sci_irq: legacy::SCI_IRQ,
        serial_ports: vec![legacy::COM1],
        rtc: Some(legacy::CMOS),
        virtio_mmio: config
            .virtio_slots()
            .iter()
            .map(|s| (s.base, s.len, s.gsi))
            .collect(),
    }
}

type VirtioDevices = (Bus, Vec<VirtioEvents>, Vec<Arc<Mutex<MmioTransport>>>);

/// The disks and NICs: each a virtio-mmio transport on the MMIO bus, an irqfd, one ioeventfd
/// per queue, and a subscriber for the event loop; with `saved`, each in its saved state.
fn virtio_devices(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    saved: Option<&MachineState>,
) -> Result<VirtioDevices, VmError> {
    let mut devs: Vec<SharedVirtioDevice> = Vec::new();
    for d in &config.disks {
        let disk = images::open_disk(&d.path, d.read_only, &d.open_options())
            .map_err(|e| VmError::Build(format!("disk {}: {e}", d.path.display())))?;
        devs.push(Arc::new(Mutex::new(
            Block::new(disk, d.read_only, &d.serial).with_block_size(d.block_size),
        )));
    }
    for n in &config.nets {
        let tap = Tap::open(&n.tap).map_err(|e| VmError::Build(format!("TAP {}: {e}", n.tap)))?;
        devs.push(Arc::new(Mutex::new(Net::new(tap, n.mac.octets()))));
    }
    let io = |e: std::io::Error| VmError::Build(format!("virtio set-up: {e}"));
    let mut bus = Bus::new();
    let mut subscribers = Vec::new();
    let mut transports = Vec::new();
    for (i, (dev, slot)) in devs.into_iter().zip(config.virtio_slots()).enumerate() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io)?;
        vm.register_irqfd(&irq, slot.gsi)
            .map_err(build_err("irqfd"))?;
        let queues = lock(&dev).queue_max_sizes().len();
        let mut evts = Vec::new();
        for q in 0..queues {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io)?;
            let addr = IoEventAddress::Mmio(slot.base + QUEUE_NOTIFY);
            vm.register_ioevent(&evt, &addr, q as u32)
                .map_err(build_err("ioeventfd"))?;
            evts.push(evt);
        }
        let clones = evts
            .iter()
            .map(|e| e.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(io)?;
        let interrupt = Arc::new(VirtioInterrupt::new(Arc::new(irq)));
        let mut transport = MmioTransport::new(dev.clone(), mem.clone(), interrupt, clones)
            .map_err(VmError::Build)?;
        if let Some(v) = saved.and_then(|s| s.virtio.get(i)) {
            transport
                .restore(&v.transport, v.active.as_deref())
                .map_err(|e| VmError::Build(format!("virtio device {i} from the snapshot: {e}")))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        bus.insert(slot.base, slot.len, transport.clone())
            .map_err(|e| VmError::Build(e.to_string()))?;
        transports.push(transport);
        subscribers.push(VirtioEvents::new(dev, evts));
    }
    Ok((bus, subscribers, transports))
}

type LegacyDevices = (
    Bus,
    Arc<Mutex<Serial>>,
    EventFd,
    Arc<Mutex<AcpiPm>>,
    Arc<Mutex<Cmos>>,
);

/// COM1, the i8042, the CMOS RTC and the ACPI registers on the port bus, with irqfds; with
/// `saved`, in their saved state.
fn legacy_devices(
    vm: &VmFd,
    persistent: &Persistent,
    requests: RequestSink,
    saved: Option<&MachineState>,
) -> Result<LegacyDevices, VmError> {
    let io = |e: std::io::Error| VmError::Build(format!("device setup: {e}"));
    let irqfd = |gsi: u8| -> Result<Arc<EventFd>, VmError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io)?;
        vm.register_irqfd(&evt, gsi.into())
            .map_err(build_err("irqfd"))?;
        Ok(Arc::new(evt))
    };
    let room = EventFd::new(libc::EFD_NONBLOCK).map_err(io)?;
    let (irq, out, room2) = (
        irqfd(legacy::COM1.1)?,
        Box::new(persistent.output.clone()),
        room.try_clone().map_err(io)?,
    );
    let serial = Arc::new(Mutex::new(match saved {
        Some(s) => Serial::from_state(&s.serial, irq, out, room2).map_err(VmError::Build)?,
        None => Serial::new(irq, out, room2),
    }));
    let mut cmos = Cmos::new(persistent.nvram.clone());
    let mut pm = AcpiPm::new(S5_SLEEP_TYPE, irqfd(legacy::SCI_IRQ)?, requests.clone());
    if let Some(s) = saved {
        cmos.set_index(s.cmos_index);
        pm.restore(s.acpi_pm);
    }
    let cmos = Arc::new(Mutex::new(cmos));
    let pm = Arc::new(Mutex::new(pm));
    let mut pio = Bus::new();
    let overlap = |e: devices::bus::Overlap| VmError::Build(e.to_string());
    pio.insert(legacy::COM1.0.into(), 8, serial.clone())
        .map_err(overlap)?;
    pio.insert(
        legacy::I8042_PORT.into(),
        5,
        Arc::new(Mutex::new(I8042::new(requests.clone()))),
    )
    .map_err(overlap)?;
    pio.insert(legacy::CMOS.0.into(), 2, cmos.clone())
        .map_err(overlap)?;
    pio.insert(legacy::PM1A_EVT.into(), AcpiPm::LEN, pm.clone())
        .map_err(overlap)?;
    debug_assert_eq!(
        u64::from(legacy::PM1A_EVT) + AcpiPm::CONTROL_OFFSET,
        u64::from(legacy::PM1A_CNT)
    );
    pio.insert(
        legacy::RESET.0.into(),
        1,
        Arc::new(Mutex::new(ResetRegister::new(requests))),
    )
    .map_err(overlap)?;
    Ok((pio, serial, room, pm, cmos))
}

/// Creates vCPU `id` with the state it had in a snapshot.
fn restore_vcpu(vm: &VmFd, id: u8, state: &VcpuState) -> Result<VcpuFd, VmError> {
    let vcpu = vm
        .create_vcpu(id.into())
        .map_err(build_err("create vCPU"))?;
    state
        .restore(&vcpu)
        .map_err(|e| VmError::Build(format!("vCPU {id} from the snapshot: {e}")))?;
    Ok(vcpu)
}

/// Creates vCPU `id` with CPUID, MSRs, FPU and LAPIC set; the boot vCPU also gets its entry
/// registers. The others wait for INIT-SIPI in the in-kernel LAPIC.
fn configure_vcpu(
    host: &Host,
    vm: &VmFd,
    id: u8,
    count: u8,
    entry: Option<BootEntry>,
) -> Result<VcpuFd, VmError> {
    let vcpu = vm
        .create_vcpu(id.into())
        .map_err(build_err("create vCPU"))?;
    let cpuid = boot::cpu::filter_cpuid(&host.cpuid, id, count, host.quirks)?;
    vcpu.set_cpuid2(&cpuid).map_err(build_err("CPUID"))?;
    let entries: Vec<_> = boot::cpu::boot_msrs()
        .into_iter()
        .filter(|m| host.msrs.contains(&m.index))
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|e| VmError::Build(format!("MSRs: {e:?}")))?;
    let set = vcpu.set_msrs(&msrs).map_err(build_err("MSRs"))?;
    if set != entries.len() {
        let failed = entries[set].index;
        return Err(VmError::Build(format!("KVM refused MSR {failed:#x}")));
    }
    vcpu.set_fpu(&boot::cpu::boot_fpu())
        .map_err(build_err("FPU"))?;
    let mut lapic = vcpu.get_lapic().map_err(build_err("LAPIC"))?;
    boot::cpu::set_lint(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(build_err("LAPIC"))?;
    if let Some(entry) = entry {
        vcpu.set_regs(&boot::cpu::boot_regs(entry))
            .map_err(build_err("registers"))?;
        let mut sregs = vcpu.get_sregs().map_err(build_err("segment registers"))?;
        boot::cpu::boot_sregs(entry, &mut sregs);
        vcpu.set_sregs(&sregs)
            .map_err(build_err("segment registers"))?;
    }
    Ok(vcpu)
}

/// Installs the handler of the signal that kicks vCPUs out of `KVM_RUN` (it sets the
/// `immediate_exit` of the vCPU the signalled thread runs).
fn install_kick_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    extern "C" fn kicked(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        vcpu::kicked();
    }
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(SIGRTMIN(), kicked) {
            tracing::error!("cannot install the vCPU kick handler: {e}");
        }
    });
}

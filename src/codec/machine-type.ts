// Facts that follow from a machine type's name (QEMU's hw/core/machine.c compat properties).

/** Version of a versioned machine type name such as pc-i440fx-10.0 or pc-q35-8.0. */
export function machineVersion(machine: string): { major: number; minor: number } | undefined {
  const m = /-(\d+)\.(\d+)$/.exec(machine);
  return m ? { major: Number(m[1]), minor: Number(m[2]) } : undefined;
}

/**
 * The multifd sync mode a QEMU destination of this machine type uses by default: machine types up
 * to 8.0 have multifd-flush-after-each-section on (a sync at every RAM EOS), later ones sync once
 * per round with MULTIFD_FLUSH (docs/protocol.md §2.6).
 */
export function defaultSyncMode(machine: string): 'round' | 'section' {
  const v = machineVersion(machine);
  if (!v) return 'round';
  return v.major < 8 || (v.major === 8 && v.minor === 0) ? 'section' : 'round';
}

/**
 * Whether a destination with switchover-ack on sends its one SWITCHOVER_ACK right after
 * OPEN_RETURN_PATH when no device holds the switchover back (QEMU 10's savevm.c
 * loadvm_process_command; 11.1 keeps this for machine types up to 11.0, "switchover-ack-legacy").
 * From pc-*-11.1 on the source counts the devices that ask for an ACK and fails on one nobody
 * asked for ("Switchover ack pending num underflowed": seen with QEMU 11.1 -M pc-i440fx-11.1,
 * while -M pc-i440fx-11.0 takes the ACK). An unversioned machine type is taken as legacy.
 */
export function sendsSwitchoverAck(machine: string): boolean {
  const v = machineVersion(machine);
  if (!v) return true;
  return v.major < 11 || (v.major === 11 && v.minor === 0);
}

// The QEMU launcher is product code (demo uses it); tests import it from here.
export * from '../../src/demo/qemu.js';

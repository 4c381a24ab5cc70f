// The dirtying boot-sector guest lives in src/demo (demo uses it too); tests import it from here.
export * from '../../src/demo/bootsector.js';

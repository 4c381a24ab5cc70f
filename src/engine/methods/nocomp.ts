// No compression: the payload is the pages themselves, passed through without a copy.

import { MultifdFlag } from '../../codec/constants.js';
import type { MultifdMethod, RecvMethodChannel } from './method.js';

export const nocomp: MultifdMethod = {
  name: 'none',
  flags: MultifdFlag.NOCOMP,
  recvSetup(): RecvMethodChannel {
    return {
      recv: (_header, payload) => payload,
      cleanup: () => {},
    };
  },
};

// No compression: the payload is the pages themselves, passed through without a copy both ways.

import { MultifdFlag } from '../../codec/constants.js';
import type { MultifdMethod, RecvMethodChannel, SendMethodChannel } from './method.js';

export const nocomp: MultifdMethod = {
  name: 'none',
  flags: MultifdFlag.NOCOMP,
  recvSetup(): RecvMethodChannel {
    return {
      recv: (_header, payload) => payload,
      cleanup: () => {},
    };
  },
  sendSetup(_channelId: number, pageSize: number): SendMethodChannel {
    return {
      prepare: (pages, normalPages) => ({ payload: pages as Buffer[], size: normalPages * pageSize }),
      cleanup: () => {},
    };
  },
};

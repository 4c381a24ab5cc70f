// Kept for imports of the old path: the handle of every conversation lives in handle.ts.
export { ListeningHandle, type ConversationRun as ListeningRun } from './handle.js';

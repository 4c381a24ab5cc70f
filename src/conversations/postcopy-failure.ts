// Kept for imports of the old path; the class lives with every other error in codec/errors.ts.
export { PostcopyFailedError } from '../codec/errors.js';

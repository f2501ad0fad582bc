// Types for rr-cluster-worker (see README.md).
import { EventEmitter } from 'node:events';
import type { Server as NetServer, Socket } from 'node:net';

declare namespace rrClusterWorker {
  interface DrainInfo {
    /** 'master' (drain message), 'disconnect' (the master is gone), 'crash',
     *  'signal' (SIGTERM/SIGINT) or 'shutdown' (worker.shutdown()). */
    reason: 'master' | 'disconnect' | 'crash' | 'signal' | 'shutdown';
    /** Time the worker has to finish, from the start of the drain. */
    deadlineMs: number;
  }

  interface ServeOptions {
    /** Serve only this listener's connections (index into `listenerInfo`); default: all. */
    listener?: number;
    /** false: do not announce ready after serve(); call worker.ready() yourself. */
    ready?: boolean;
    /** During a drain, idle keep-alive connections are closed after this many ms. Default 2000. */
    idleGraceMs?: number;
    /** Called when the drain starts; the exit waits for its promise (until the deadline). */
    onDrain?: (info: DrainInfo) => void | Promise<void>;
    /** Deadline of a drain the worker starts itself (master gone, crash, signal,
     *  shutdown()). Default 10000. */
    shutdownTimeoutMs?: number;
    /** Print, announce and drain on uncaught exceptions / unhandled rejections. Default true. */
    handleErrors?: boolean;
    /** Drain on SIGTERM and SIGINT (a second one exits at once). Default true. */
    handleSignals?: boolean;
    /** Outside a pool: the port to listen on. Default $PORT, else 3000. */
    port?: number;
    /** Outside a pool: the host to listen on. Default: Node's (all addresses). */
    host?: string;
  }

  interface ListenerInfo {
    kind: 'tcp' | 'unix' | string;
    address: string;
  }

  interface Worker extends EventEmitter {
    /** True when started by an rr-cluster master with the Node dialect. */
    readonly isWorker: boolean;
    /** Slot 0..N-1 (0 outside a pool). */
    readonly id: number;
    /** Reloads the pool went through when this worker started (0 outside a pool). */
    readonly generation: number;
    /** Heartbeat period in ms. */
    readonly heartbeatMs: number;
    /** The master's listeners; a connection's listener number indexes this array. */
    readonly listenerInfo: ListenerInfo[];
    /** True from the start of the drain on. */
    readonly draining: boolean;
    /** Connections open in the served servers. */
    readonly active: number;

    serve<S extends NetServer>(server: S, options?: ServeOptions): S;
    ready(): void;
    /** A user message to the master. Throws a TypeError for a reserved value, a RangeError
     *  for one whose JSON is longer than 64 KiB, 65536 bytes (the newline after it not
     *  counted): the master would drop it. */
    send(value: unknown, callback?: (err: Error | null) => void): boolean;
    shutdown(reason?: string): void;

    on(event: 'message', listener: (message: unknown, handle?: Socket | NetServer) => void): this;
    on(event: 'drain', listener: (info: DrainInfo) => void): this;
    on(event: string | symbol, listener: (...args: any[]) => void): this;
    once(event: 'message', listener: (message: unknown, handle?: Socket | NetServer) => void): this;
    once(event: 'drain', listener: (info: DrainInfo) => void): this;
    once(event: string | symbol, listener: (...args: any[]) => void): this;
  }
}

declare const rrClusterWorker: rrClusterWorker.Worker;
export = rrClusterWorker;

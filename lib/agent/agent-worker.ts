// Entry of the agent worker thread (lib/agent/worker-transport.ts): serves the main thread's exchanges.
import { parentPort } from 'node:worker_threads'
import type { MessagePort } from 'node:worker_threads'
import { serveExchanges } from './worker-transport'

// Loaded only as a worker's entry, where parentPort is set.
serveExchanges(parentPort as MessagePort)

// Agent worker entries that fail, for test/agent-worker.test.ts. AGENT_WORKER_FAILURE picks how:
//   load   throws while loading: the worker never answers anything
//   crash  serves like the real one, but exits with code 3 on a call whose path starts with /crash
import { parentPort } from 'node:worker_threads'
import type { MessagePort } from 'node:worker_threads'
import { serveExchanges } from '../../lib/agent/worker-transport'

const port = parentPort as MessagePort
if (process.env.AGENT_WORKER_FAILURE === 'load') throw new Error('boom at load')
port.on('message', (message: { type: string, req?: { path: string } }) => {
  if (message.type === 'call' && message.req?.path.startsWith('/crash') === true) process.exit(3)
})
serveExchanges(port)

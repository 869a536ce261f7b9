// Imported before test/agent-client.test.ts by test/agent-client-worker.test.ts: its clients then
// send their traffic from the agent worker thread.
process.env.TEST_AGENT_CLIENT_WORKER = '1'

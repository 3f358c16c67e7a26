// An ES module config (PM2 reads .config.mjs with import()).
const common = { autorestart: true, max_restarts: 5 };

export default {
  apps: [
    { ...common, name: 'esm-web', script: '../../apps/node_hello.js', instances: 2 },
    { ...common, name: 'esm-worker', script: '../../apps/idle.py', interpreter: 'python3' },
  ],
};

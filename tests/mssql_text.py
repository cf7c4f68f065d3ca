"""What the SQL Server golden-text tests share: a source URL and the text pyodbc would be sent."""

from __future__ import annotations

from sqlalchemy.dialects import mssql as ms

URL = "mssql+pyodbc://loader:S3cret-pw@sqlhost:1433/sales?driver=ODBC+Driver+18+for+SQL+Server"
PYODBC = ms.pyodbc.dialect(paramstyle="qmark")  # pyodbc's paramstyle, without importing pyodbc


def compile_(statement) -> tuple[str, list]:
    """Statement text as sent to pyodbc, and its positional parameters."""
    compiled = statement.compile(dialect=PYODBC, compile_kwargs={"render_postcompile": True})
    params = compiled.construct_params()
    return str(compiled), [params[name] for name in compiled.positiontup]


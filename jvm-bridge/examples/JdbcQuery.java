// A plain JDBC client of the Thrift server started with the bridge (see README, "JVM").
//   java -cp "<pyspark jars>/*:." JdbcQuery jdbc:hive2://127.0.0.1:10000 "SELECT ..."
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.Statement;

public class JdbcQuery {
  public static void main(String[] args) throws Exception {
    Class.forName("org.apache.hive.jdbc.HiveDriver");
    try (Connection conn = DriverManager.getConnection(args[0], System.getProperty("user.name"), "");
         Statement st = conn.createStatement();
         ResultSet rs = st.executeQuery(args[1])) {
      int columns = rs.getMetaData().getColumnCount();
      while (rs.next()) {
        StringBuilder line = new StringBuilder("ROW");
        for (int i = 1; i <= columns; i++) line.append('\t').append(rs.getString(i));
        System.out.println(line);
      }
    }
  }
}
